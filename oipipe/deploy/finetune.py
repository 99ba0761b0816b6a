"""The fine-tune shared by the compressions that train after the trained model changed
(quantization-aware training, channel pruning): a few epochs over the training split, the
validation loss keeping the best, resumable epoch by epoch.

`settings`: `epochs`, `lr`, `batch`, `seed`. The training stage's augmentation, each sample's
seeded by (seed, epoch, index); Adam at `lr`; the model in eval mode throughout (dropout off,
batch-norm statistics frozen: small batches would wreck them, so only the weights, and a
quantizer's ranges, move). Epoch 0 is the model as it came in: with zero epochs, or when no
epoch lowers the validation loss, the result is exactly that model. Each epoch's state is saved
in a work folder (`work_folder`, keyed by the checkpoint, the settings and the prepared data): a
killed run resumes at the next epoch and ends as an uninterrupted one would.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oipipe.core import progress
from oipipe.core.config import path
from oipipe.core.files import atomic_open
from oipipe.data.datasets import PreparedImages, train_transform
from oipipe.deploy.build import BuildContext
from oipipe.measure import evaluation

log = logging.getLogger("oipipe.deploy.finetune")


def work_folder(ctx: BuildContext, kind: str, blob: Any) -> Path:
    """`paths.cache/<kind>/<key>`: one folder per (checkpoint, `blob` (the settings that make
    the result), prepared data)."""
    h = hashlib.sha256()
    h.update(path(ctx.cfg, "checkpoint").read_bytes())
    h.update(json.dumps(blob, sort_keys=True).encode())
    prepared = path(ctx.cfg, "prepared")
    for f in ("train.csv", "val.csv", "labels.txt"):
        h.update((prepared / f).read_bytes())
    return path(ctx.cfg, "cache") / kind / h.hexdigest()[:16]


def _loss(model: torch.nn.Module, images: torch.Tensor, labels: np.ndarray, batch: int) -> float:
    target = torch.as_tensor(labels)
    with torch.no_grad():
        out = torch.cat([model(x) for x in evaluation.batches(images, batch)])
    return float(torch.nn.functional.cross_entropy(out, target))


def fit(
    ctx: BuildContext,
    model: torch.nn.Module,
    work: Path,
    settings: dict[str, Any],
    what: str,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Fine-tune `model` in place to its best epoch by validation loss, resuming from `work`;
    returns the facts for the record, their keys prefixed `<what>_`. `stop_after`: end after that
    many epochs in this call, as a kill would (the tests' interruption)."""
    s = settings
    prepared, meta = path(ctx.cfg, "prepared"), ctx.meta
    train = PreparedImages(
        prepared, "train", train_transform(meta["input_size"], meta["mean"], meta["std"])
    )
    val_images, val_labels = evaluation.images(prepared, ["val"], meta)
    work.mkdir(parents=True, exist_ok=True)
    last = work / "last.pt"
    optimizer = torch.optim.Adam(model.parameters(), lr=s["lr"])
    if last.is_file():
        saved = torch.load(last, weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = {k: saved[k] for k in ("epoch", "val_losses", "best_epoch", "best")}
        log.info("%s fine-tune resumes after epoch %d (%s)", what, state["epoch"], work)
    else:
        state = {
            "epoch": 0,
            "val_losses": [_loss(model, val_images, val_labels, s["batch"])],
            "best_epoch": 0,
            "best": copy.deepcopy(model.state_dict()),
        }
    model.eval()
    done_now = 0
    while state["epoch"] < s["epochs"] and (stop_after is None or done_now < stop_after):
        epoch = state["epoch"] + 1
        g = torch.Generator().manual_seed(s["seed"] * 1000 + epoch)
        order = torch.randperm(len(train), generator=g).tolist()
        seeds = torch.randint(0, 2**31 - 1, (len(train),), generator=g).tolist()
        steps = -(-len(order) // s["batch"])
        with progress.steps(steps, f"{what} epoch {epoch}/{s['epochs']}", "batch") as bar:
            for k in range(0, len(order), s["batch"]):
                items = [train[(i, seeds[i])] for i in order[k : k + s["batch"]]]
                x = torch.stack([img for img, _ in items])
                y = torch.tensor([label for _, label in items])
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
                bar.update(1)
        loss = _loss(model, val_images, val_labels, s["batch"])
        state["val_losses"].append(loss)
        if loss < min(state["val_losses"][:-1]):
            state["best_epoch"], state["best"] = epoch, copy.deepcopy(model.state_dict())
        state["epoch"] = epoch
        with atomic_open(last, "wb") as f:
            torch.save(
                {**state, "model": model.state_dict(), "optimizer": optimizer.state_dict()}, f
            )
        log.info("%s epoch %d: validation loss %.4f", what, epoch, loss)
        done_now += 1
    if state["epoch"] < s["epochs"]:
        return {f"{what}_epochs_run": state["epoch"], "interrupted": True}
    model.load_state_dict(state["best"])
    return {
        f"{what}_epochs_run": state["epoch"],
        f"{what}_best_epoch": state["best_epoch"],
        f"{what}_val_losses": [round(v, 5) for v in state["val_losses"]],
        f"{what}_work": str(work),
    }
