"""Quantization-aware training: `openvino_qat_int8`, an OpenVINO int8 IR whose quantized model was
fine-tuned with its quantization in the loop.

Why NNCF's PyTorch QAT (nncf 3.4): it quantizes the torch model with the same scheme and
settings as the post-training `openvino_int8` (`nncf.quantize`, `optimize.settings.openvino_int8`:
symmetric int8 weights per channel, FakeQuantize on activations, the same calibration images;
only the bias correction is the fast one, the torch backend having no other),
the result trains as an ordinary module, and `ov.convert_model` turns its FakeQuantize nodes into
the IR's int8 layers. torchao's `QATConfig` fake-quantizes Linear and Embedding layers only (on a
CNN: the classifier alone); PT2E's `prepare_qat_pt2e` gives an Inductor or ONNX graph, not the
OpenVINO one whose post-training twin we compare against.

The fine-tune (`optimize.settings.openvino_qat_int8`): `epochs` epochs over the training split
with the training stage's augmentation, Adam at `lr`, the model in eval mode throughout (dropout
off, batch-norm statistics frozen: small batches would wreck them), each sample's augmentation
seeded by (seed, epoch, index). After each epoch the loss on the validation split decides
whether it is the best so far; epoch 0 is the post-training model itself, so with zero epochs,
or when no epoch lowers the validation loss, the result is exactly the post-training model. Each
epoch's state is saved in a work folder under `paths.cache` (keyed by the checkpoint, the
settings and the prepared data): a killed build resumes at the next epoch and ends as an
uninterrupted one would. The record compares the result with its own post-training start on the
evaluation images (paired difference, discordant images), beside the usual verdict against fp32.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from oipipe.core import progress
from oipipe.core.config import path
from oipipe.core.files import atomic_open
from oipipe.data.datasets import PreparedImages, train_transform
from oipipe.deploy.build import BuildContext, BuildFailed
from oipipe.deploy.build_openvino import save_openvino
from oipipe.deploy.runtime import OPENVINO_META
from oipipe.measure import evaluation
from oipipe.measure.intervals import paired_counts, paired_difference

log = logging.getLogger("oipipe.deploy.build_qat")

QUANTIZER = "openvino_int8"  # whose quantizer settings QAT starts from: the post-training twin


def quantize(ctx: BuildContext) -> torch.nn.Module:
    """The post-training NNCF quantization of (a copy of) the trained torch model: the QAT start."""
    import nncf

    settings = dict(OmegaConf.to_container(ctx.cfg.optimize.settings[QUANTIZER]))  # type: ignore[arg-type]
    settings["preset"] = nncf.QuantizationPreset(settings["preset"])
    # NNCF's torch backend has only the fast bias correction ("fast_bias_correction=False is
    # not supported"): the one setting where the QAT start differs from its IR twin
    settings["fast_bias_correction"] = True
    ctx.notes["qat_start"] = {k: str(getattr(v, "value", v)) for k, v in settings.items()}
    batches = list(ctx.calibration())
    ctx.notes["calibration_images"] = sum(len(b) for b in batches)
    model = copy.deepcopy(ctx.model).eval()
    return nncf.quantize(model, nncf.Dataset(batches), subset_size=len(batches), **settings)


def work_folder(ctx: BuildContext) -> Path:
    """Where a run's epochs are kept: one folder per (checkpoint, settings, prepared data)."""
    h = hashlib.sha256()
    h.update(path(ctx.cfg, "checkpoint").read_bytes())
    blob = {
        "qat": ctx.settings,
        "quantizer": OmegaConf.to_container(ctx.cfg.optimize.settings[QUANTIZER]),
        "calibration": [ctx.cfg.optimize.calibration_images, ctx.cfg.optimize.calibration_batch],
    }
    h.update(json.dumps(blob, sort_keys=True).encode())
    prepared = path(ctx.cfg, "prepared")
    for f in ("train.csv", "val.csv", "labels.txt"):
        h.update((prepared / f).read_bytes())
    return path(ctx.cfg, "cache") / "qat" / h.hexdigest()[:16]


def _loss(model: torch.nn.Module, images: torch.Tensor, labels: np.ndarray, batch: int) -> float:
    target = torch.as_tensor(labels)
    with torch.no_grad():
        out = torch.cat([model(x) for x in evaluation.batches(images, batch)])
    return float(torch.nn.functional.cross_entropy(out, target))


def fit(ctx: BuildContext, model: torch.nn.Module, stop_after: int | None = None) -> dict[str, Any]:
    """Fine-tune the quantized `model` in place to its best epoch by validation loss, resuming
    from the work folder; returns the facts for the record. `stop_after`: end after that many
    epochs in this call, as a kill would (the tests' interruption)."""
    s = ctx.settings
    prepared, meta = path(ctx.cfg, "prepared"), ctx.meta
    train = PreparedImages(
        prepared, "train", train_transform(meta["input_size"], meta["mean"], meta["std"])
    )
    val_images, val_labels = evaluation.images(prepared, ["val"], meta)
    work = work_folder(ctx)
    work.mkdir(parents=True, exist_ok=True)
    last = work / "last.pt"
    optimizer = torch.optim.Adam(model.parameters(), lr=s["lr"])
    state: dict[str, Any] = {
        "epoch": 0,
        "val_losses": [_loss(model, val_images, val_labels, s["batch"])],
        "best_epoch": 0,
        "best": copy.deepcopy(model.state_dict()),
    }
    if last.is_file():
        saved = torch.load(last, weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = {k: saved[k] for k in ("epoch", "val_losses", "best_epoch", "best")}
        log.info("QAT resumes after epoch %d (%s)", state["epoch"], work)
    model.eval()  # dropout off, batch norm frozen: only the weights and quantizer ranges move
    done_now = 0
    while state["epoch"] < s["epochs"] and (stop_after is None or done_now < stop_after):
        epoch = state["epoch"] + 1
        g = torch.Generator().manual_seed(s["seed"] * 1000 + epoch)
        order = torch.randperm(len(train), generator=g).tolist()
        seeds = torch.randint(0, 2**31 - 1, (len(train),), generator=g).tolist()
        steps = -(-len(order) // s["batch"])
        with progress.steps(steps, f"QAT epoch {epoch}/{s['epochs']}", "batch") as bar:
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
        log.info("QAT epoch %d: validation loss %.4f", epoch, loss)
        done_now += 1
    if state["epoch"] < s["epochs"]:
        return {"qat_epochs_run": state["epoch"], "interrupted": True}
    model.load_state_dict(state["best"])
    return {
        "qat_epochs_run": state["epoch"],
        "qat_best_epoch": state["best_epoch"],
        "qat_val_losses": [round(v, 5) for v in state["val_losses"]],
        "qat_work": str(work),
    }


def against_post_training(
    ctx: BuildContext, start: torch.nn.Module, tuned: torch.nn.Module
) -> dict[str, Any]:
    """The tuned model against its own post-training start, paired, on the evaluation images
    (`optimize.eval_splits`): which of the two to ship at equal speed."""
    images, labels = evaluation.images(
        path(ctx.cfg, "prepared"), ctx.cfg.optimize.eval_splits, ctx.meta
    )
    batches = evaluation.batches(images, ctx.cfg.optimize.eval_batch)
    ptq = np.concatenate(evaluation.logits(start, batches))
    qat = np.concatenate(evaluation.logits(tuned, batches))
    p = paired_difference(*paired_counts(ptq.argmax(1) == labels, qat.argmax(1) == labels))
    return {
        "post_training_top1_pct": round(100 * float((ptq.argmax(1) == labels).mean()), 3),
        "vs_post_training_delta_pct": round(100 * p.delta, 3),
        "vs_post_training_ci_low_pct": round(100 * p.low, 3),
        "vs_post_training_ci_high_pct": round(100 * p.high, 3),
        "vs_post_training_worse": p.worse,
        "vs_post_training_better": p.better,
        "vs_post_training_images": p.n,
    }


def openvino_qat_int8(ctx: BuildContext, dst: Path) -> None:
    """Post-training NNCF int8 of the torch model, fine-tuned with its fake quantization, then
    converted to an OpenVINO IR (batch dynamic, meta.json in rt_info); the build fails when the
    IR runs no layer in int8."""
    import openvino as ov

    model = quantize(ctx)
    start = copy.deepcopy(model)
    facts = fit(ctx, model)
    ctx.notes.update(facts)
    ctx.notes.update(against_post_training(ctx, start, model))
    with progress.phase(log, "converting the QAT model to an OpenVINO IR"):
        ir = ov.convert_model(model, example_input=ctx.example)
    size = ctx.meta["input_size"]
    ir.reshape([-1, 3, size, size])
    ir.set_rt_info(json.dumps(ctx.meta, sort_keys=True), list(OPENVINO_META))
    save_openvino(ctx, ir, dst, "int8")
    if ctx.notes["int8_layers"] == 0:
        raise BuildFailed("the compiled IR runs no layer in int8: no FakeQuantize survived")
    shutil.rmtree(facts["qat_work"], ignore_errors=True)  # built: the epochs are not needed
