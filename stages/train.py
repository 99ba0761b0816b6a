"""Stage `train`: fine-tune a pretrained model on the prepared subset (transfer learning).

The checkpoint kept is the epoch with the lowest validation loss, not the best accuracy: on a few
dozen validation images accuracy moves in steps of 1/n and ties. While it runs, a complete
checkpoint of the last epoch sits in a work folder under `paths.cache` keyed by everything that
defines the run, so a killed run started again resumes there. Recipes, precision, outputs and
exit codes: docs/stages/train.md.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sized
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from oipipe.core import cli, progress
from oipipe.core.config import path
from oipipe.core.errors import InputError, StageError
from oipipe.core.files import atomic_open, read_csv, write_csv, write_json
from oipipe.core.tracking import StageRun, stage_run
from oipipe.data.datasets import (
    PreparedImages,
    SeededSampler,
    eval_transform,
    read_classes,
    train_transform,
)
from oipipe.measure.intervals import wilson
from oipipe.reporting.plots import figure
from oipipe.training import models

log = logging.getLogger("stages.train")

# The checkpoint kept and early stopping follow the validation loss (the module docstring says why)
SELECTED_BY = "val_loss"
HISTORY_FIELDS = [
    "epoch",
    "train_loss",
    "train_acc_pct",
    "val_loss",
    "val_acc_pct",
    "lr",
    "train_images",
    "train_images_per_s",
    "epoch_seconds",
]


class TrainingDiverged(StageError):
    """The loss became NaN or infinite."""


# --- hardware choices --------------------------------------------------------------------------


# train.precision=auto on CPU times the real model before training and takes bf16 autocast only
# when it is this much faster than fp32. CPU flags (`machine.cpu_has_native_bf16`) do not
# predict it: bf16 has trained slower than fp32 on a CPU with AMX, and without AVX512-BF16 or AMX
# it is emulated (benchmarks/results/design_figures.md has the figures). 10%: a smaller gain is
# within the noise of a few timed steps on a shared machine and not worth bf16's coarser
# gradients.
BF16_MIN_SPEEDUP = 1.10
# Timed steps per precision, after one warm-up step each, on one whole training batch: on a
# smaller batch the ratio comes out different, and fp32 slows per image as the batch grows
# (design_figures.md). The probe costs seconds at 224 px, and less than one at the tests' 64 px.
PRECISION_PROBE_ROUNDS = 2


def select_device(want: str) -> torch.device:
    if want == "cuda" and not torch.cuda.is_available():
        raise InputError("train.device=cuda but no CUDA device is available; use auto or cpu")
    return torch.device("cuda" if want in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def choose_precision(
    fp32_images_per_s: float, bf16_images_per_s: float, min_speedup: float = BF16_MIN_SPEEDUP
) -> str:
    """bf16 only where it was measured clearly faster than fp32."""
    return "bf16" if bf16_images_per_s >= min_speedup * fp32_images_per_s else "fp32"


def select_precision(
    want: str,
    device: torch.device,
    measure: Callable[[], dict[str, float]] | None = None,
    deterministic: bool = False,
) -> tuple[str, dict]:
    """The training precision and how it was chosen (flat, for train.json).

    `measure` (images/s per precision, see `measure_precisions`) runs only for auto on CPU, and
    not with `deterministic`: a timing can come out either way from run to run, so a
    bit-reproducible run takes fp32."""
    if want == "fp16" and device.type != "cuda":
        raise InputError("train.precision=fp16 needs CUDA; on CPU use bf16 or fp32")
    if want != "auto":
        return want, {"precision_chosen_by": "config"}
    if device.type == "cuda":  # tensor cores: fp16 with a gradient scaler
        return "fp16", {"precision_chosen_by": "cuda"}
    if deterministic:
        return "fp32", {"precision_chosen_by": "deterministic"}
    if measure is None:
        raise ValueError("train.precision=auto on CPU needs a measurement")
    speed = measure()
    choice = choose_precision(speed["fp32"], speed["bf16"])
    return choice, {
        "precision_chosen_by": "measured",
        "precision_fp32_images_per_s": round(speed["fp32"], 2),
        "precision_bf16_images_per_s": round(speed["bf16"], 2),
        "precision_bf16_speedup": round(speed["bf16"] / speed["fp32"], 3),
        "precision_bf16_min_speedup": BF16_MIN_SPEEDUP,
    }


def measure_precisions(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    device: torch.device,
    channels_last: bool,
    rounds: int = PRECISION_PROBE_ROUNDS,
) -> dict[str, float]:
    """Images/s of forward + backward of `model` (as it will train: its requires_grad, train
    mode) in fp32 and in bf16 autocast, on a copy (batch norm statistics and gradients of
    `model` stay as they were). One warm-up step each, then `rounds` interleaved steps each, so
    that a burst of load elsewhere hits both; the fastest step of each counts."""
    m = copy.deepcopy(model).train()
    freeze_frozen_norms(m)
    x, y = x.to(device), y.to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    loss_fn = nn.CrossEntropyLoss()

    def step(precision: str) -> float:
        t0 = time.perf_counter()
        with autocast(device, precision):
            loss = loss_fn(m(x).float(), y)
        loss.backward()
        loss.item()  # the stage's host sync; also waits for an asynchronous device
        m.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    best = {"fp32": math.inf, "bf16": math.inf}
    with torch.random.fork_rng(devices=[]):  # dropout draws here leave training's RNG alone
        for p in best:
            step(p)
        for _ in range(rounds):
            for p in best:
                best[p] = min(best[p], step(p))
    return {p: len(y) / s for p, s in best.items()}


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# --- recipes -----------------------------------------------------------------------------------


# train.recipe -> (what trains in the probe phase, what trains after it). Only lp_ft has a probe
# phase (`train.probe_epochs` long): LP-FT (Kumar et al. 2022, "Fine-Tuning can Distort
# Pretrained Features and Underperform Out-of-Distribution") first fits the new head on frozen
# features, so that unfreezing the backbone does not send a random head's large gradients into
# it. The names are `oipipe.core.config.CHOICES["train.recipe"]` (a test keeps the two equal).
RECIPES: dict[str, tuple[str | None, str]] = {
    "linear_probe": (None, "linear_probe"),
    "full": (None, "full"),
    "partial": (None, "partial"),
    "lp_ft": ("linear_probe", "full"),
}


def probe_epochs(train: DictConfig) -> int:
    """Epochs of the probe phase: `train.probe_epochs` for lp_ft (never more than the run), else
    0."""
    return min(train.probe_epochs, train.epochs) if RECIPES[train.recipe][0] else 0


def layers_at(train: DictConfig, epoch: int) -> str:
    """What trains in `epoch` (1-based): linear_probe, full or partial."""
    probe, main = RECIPES[train.recipe]
    return probe if probe is not None and epoch <= probe_epochs(train) else main


def apply_recipe(model: nn.Module, layers: str, unfreeze_blocks: int) -> None:
    """Set requires_grad for `layers` (linear_probe, full or partial): the head always trains."""
    head = model.get_submodule(models.head_name(model))
    model.requires_grad_(layers == "full")
    head.requires_grad_(True)
    if layers == "partial":
        stages_ = models.blocks(model)
        if unfreeze_blocks > len(stages_):
            raise InputError(
                f"train.unfreeze_blocks={unfreeze_blocks} but {type(model).__name__}"
                f" has {len(stages_)} blocks"
            )
        for block in stages_[-unfreeze_blocks:]:
            block.requires_grad_(True)


def freeze_frozen_norms(model: nn.Module) -> None:
    """Keep batch-norm statistics of frozen layers fixed (train() would update them)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in m.parameters()
        ):
            m.eval()


def param_groups(model: nn.Module, train: DictConfig) -> list[dict]:
    """Every parameter that trains in some phase (requires_grad now: call it with the last
    phase's recipe applied), head groups first: head at `lr`, backbone at
    `lr * backbone_lr_scale`; no weight decay on biases/norms. A parameter frozen in the current
    phase gets no gradient, and AdamW and SGD leave a parameter without one untouched (weight
    decay included), so one optimiser serves both phases of lp_ft."""
    head = models.head_name(model) + "."
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((name.startswith(head), p.ndim > 1), []).append(p)
    return [
        {
            "params": ps,
            "head": is_head,
            "lr": train.lr * (1.0 if is_head else train.backbone_lr_scale),
            "weight_decay": train.weight_decay if decay else 0.0,
        }
        for (is_head, decay), ps in sorted(groups.items(), key=lambda kv: not kv[0][0])
    ]


def make_optimizer(groups: list[dict], train: DictConfig) -> torch.optim.Optimizer:
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=train.lr)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine to `min_ratio` at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def make_scheduler(
    opt: torch.optim.Optimizer, train: DictConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per step: warmup (`train.warmup_epochs`) then cosine to `train.min_lr_ratio`, once per
    phase. In lp_ft's probe phase the head runs at `train.probe_lr` and the (frozen) backbone at
    0; the fine-tuning phase starts its own warmup, from the probe's head.

    A function of the step alone (no state but the step count), so a resumed run, whose
    scheduler is rebuilt and given the saved step, follows the same curve across the switch."""
    probe = probe_epochs(train) * steps_per_epoch
    total = train.epochs * steps_per_epoch
    warmup = train.warmup_epochs * steps_per_epoch

    def factor(head: bool) -> Callable[[int], float]:
        def f(step: int) -> float:
            if step < probe:
                return (train.probe_lr / train.lr if head else 0.0) * warmup_cosine(
                    step, min(warmup, probe), probe, train.min_lr_ratio
                )
            return warmup_cosine(step - probe, warmup, total - probe, train.min_lr_ratio)

        return f

    return torch.optim.lr_scheduler.LambdaLR(opt, [factor(g["head"]) for g in opt.param_groups])


# --- loops -------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_epoch(state: TrainState, epoch: int) -> dict:
    """One pass over the training split; the mean loss and accuracy, images and seconds."""
    model, opt, sched, scaler = state.fwd, state.opt, state.sched, state.scaler
    device, precision, train = state.device, state.precision, state.train
    model.train()
    freeze_frozen_norms(model)
    loss_sum, correct, seen, t0 = 0.0, 0, 0, time.perf_counter()
    bar = progress.bar(state.train_loader, desc=f"epoch {epoch}", unit="batch", leave=False)
    for step, (x, y) in enumerate(bar, start=1):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            logits = model(x)
            loss = state.loss_fn(logits.float(), y)
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"loss is {loss.item()} at epoch {epoch}, step {step}: training diverged. Lower "
                "train.lr, keep train.grad_clip on, or check the weights and the data"
            )
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if train.grad_clip > 0:
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(
                [p for g in opt.param_groups for p in g["params"]], train.grad_clip
            )
        scaler.step(opt)
        scaler.update()
        sched.step()
        n = y.numel()
        loss_sum += loss.item() * n
        correct += (logits.argmax(1) == y).sum().item()
        seen += n
        bar.set_postfix(
            loss=f"{loss_sum / seen:.3f}",
            acc=f"{100 * correct / seen:.1f}%",
            img_s=f"{seen / (time.perf_counter() - t0):.1f}",
            refresh=False,
        )
    dt = time.perf_counter() - t0
    return {
        "train_loss": loss_sum / max(seen, 1),
        "train_acc_pct": 100 * correct / max(seen, 1),
        "train_images": seen,
        "train_seconds": dt,
    }


@torch.no_grad()
def predict(model, loader, device, precision, channels_last=False) -> tuple[np.ndarray, ...]:
    """Logits-derived (loss per sample, predictions, targets) over a whole split."""
    model.eval()
    losses, preds, targets = [], [], []
    for x, y in loader:
        x = x.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            logits = model(x).float()
        losses.append(nn.functional.cross_entropy(logits.cpu(), y, reduction="none").numpy())
        preds.append(logits.argmax(1).cpu().numpy())
        targets.append(y.numpy())
    if not preds:
        return np.zeros(0), np.zeros(0, dtype=int), np.zeros(0, dtype=int)
    return np.concatenate(losses), np.concatenate(preds), np.concatenate(targets)


def classification_report(
    preds: np.ndarray, targets: np.ndarray, classes: list[str]
) -> tuple[dict, np.ndarray]:
    k = len(classes)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (targets, preds), 1)
    report: dict[str, Any] = {"accuracy": float(np.trace(cm) / max(cm.sum(), 1))}
    for i, name in enumerate(classes):
        tp = cm[i, i]
        predicted, actual = cm[:, i].sum(), cm[i, :].sum()
        report[f"{name}.precision_pct"] = 100 * float(tp / predicted) if predicted else 0.0
        report[f"{name}.recall_pct"] = 100 * float(tp / actual) if actual else 0.0
    return report, cm


def make_train_loader(
    ds: PreparedImages, batch_size: int, num_workers: int, seed: int, device: torch.device
) -> tuple[DataLoader, SeededSampler]:
    """The training loader; call `sampler.set_epoch(e)` before each epoch.

    Each epoch's order and augmentation are a function of (seed, epoch) alone, so a resumed run
    replays exactly what an uninterrupted one does, and the workers can live across epochs:
    re-forking them every epoch from a multi-GB training process costs seconds of
    copy-on-write faults on the next step.
    """
    sampler = SeededSampler(len(ds), seed)
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=len(ds) > batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
    )
    return loader, sampler


# --- checkpoints -------------------------------------------------------------------------------


def save_checkpoint(file: Path, **state: Any) -> None:
    with atomic_open(file, "wb") as f:
        torch.save(state, f)


def load_checkpoint(file: Path) -> dict:
    """A checkpoint of the work folder (last.pt, best.pt), which only this stage writes."""
    fix = f"delete {file.parent} to start the run over"
    ck = models.load_file(file, "checkpoint", fix)
    if not isinstance(ck, dict):
        raise InputError(f"checkpoint {file} holds a {type(ck).__name__}, not a dict; {fix}")
    return ck


def run_key(cfg: DictConfig, prepared: Path) -> str:
    """What defines a training run: model, recipe and the exact prepared data."""
    # the whole train group: what only changes how a run goes lives in `runtime` (not hashed)
    blob = json.dumps(
        {"model": OmegaConf.to_container(cfg.model), "train": OmegaConf.to_container(cfg.train)},
        sort_keys=True,
    ).encode()
    h = hashlib.sha256(blob)
    for split in ("train", "val", "labels"):
        f = prepared / (f"{split}.csv" if split != "labels" else "labels.txt")
        h.update(f.read_bytes())
        if split != "labels":
            # the CSVs name the same files at any data.image_size: their sizes tell the images
            # apart, so a run killed at 256 px never resumes as a run at 128 px
            for row in read_csv(f):
                h.update(f"{row['file']}:{(prepared / row['file']).stat().st_size};".encode())
    return h.hexdigest()[:16]


# --- the stage ---------------------------------------------------------------------------------


@dataclass
class TrainState:
    """One training run between its named steps: what `build` makes, and the progress that
    `fit` advances, each epoch's checkpoint saves and `resume` restores."""

    cfg: DictConfig
    work: Path  # the run's folder under paths.cache (last.pt to resume, best.pt to keep)
    classes: list[str]
    device: torch.device
    model: nn.Module
    fwd: nn.Module  # what runs forward in training and validation: `model` or its torch.compile
    train_loader: DataLoader
    sampler: SeededSampler
    val_loader: DataLoader
    test_loader: DataLoader
    precision: str
    precision_choice: dict  # how `precision` was chosen (flat, into train.json)
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module
    meta: dict  # what inference needs: architecture, classes, normalisation, input size
    config: dict  # the resolved config, saved in every checkpoint
    history: list[dict] = field(default_factory=list)  # one row per epoch (HISTORY_FIELDS)
    start: int = 1  # the first epoch `fit` trains: after those a resumed run has done
    best_loss: float = math.inf
    best_epoch: int = 0
    stale: int = 0  # epochs since the validation loss last fell (early stopping)

    @property
    def train(self) -> DictConfig:
        return self.cfg.train

    def record(self, row: dict) -> bool:
        """Add an epoch's row; True when its validation loss is the lowest so far."""
        self.history.append(row)
        if row["val_loss"] < self.best_loss:
            self.best_loss, self.best_epoch, self.stale = row["val_loss"], row["epoch"], 0
            return True
        if row["epoch"] > probe_epochs(self.train):  # early stopping never fires in the probe
            self.stale += 1
        return False

    def checkpoint(self, epoch: int) -> dict:
        """Everything `resume` needs to go on after `epoch`, and what inference needs."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "selected_by": SELECTED_BY,
            "best_val_loss": self.best_loss,
            "best_epoch": self.best_epoch,
            "stale_epochs": self.stale,
            "history": self.history,
            "precision_choice": self.precision_choice,
            "config": self.config,
            "meta": self.meta,
        }


def run(cfg: DictConfig) -> dict:
    """Fine-tune `model.name` on the prepared data; returns the metrics it wrote."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        return _run(cfg)
    finally:  # a process-wide switch: leave it as the caller had it (tests, sweeps in-process)
        torch.use_deterministic_algorithms(was_deterministic)


def _run(cfg: DictConfig) -> dict:
    state, last = build(cfg)
    resume(state, last)
    del last  # the resumed optimiser state and history are in `state` now
    announce(state)
    wall0 = time.perf_counter()
    with stage_run(cfg, "train", system_metrics=cfg.runtime.system_metrics) as tracker:
        tracker.log_params(
            {
                "model": OmegaConf.to_container(cfg.model),
                "train": OmegaConf.to_container(cfg.train),
                "train.resolved_precision": state.precision,
                "train.device_resolved": str(state.device),
                "train.trainable_params": count_params(state.model, trainable=True),
            }
        )
        fit(state, tracker)
        result = evaluate(state, wall=time.perf_counter() - wall0)
        write(state, result, tracker)
    shutil.rmtree(state.work, ignore_errors=True)
    return result.metrics


def build(cfg: DictConfig) -> tuple[TrainState, dict | None]:
    """Data, model, loaders, precision, optimiser and schedule of a run; and the last checkpoint
    of a killed run with the same config and data, when there is one (for `resume`)."""
    train, mcfg, runtime = cfg.train, cfg.model, cfg.runtime
    prepared = path(cfg, "prepared")
    classes = read_classes(prepared)
    device = select_device(train.device)
    if train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    seed_everything(train.seed)
    train_ds, val_ds, test_ds = splits(prepared, mcfg)

    model, source = models.build(mcfg.name, len(classes), mcfg.weights)
    # As in the last phase, which trains the most: the optimiser gets every parameter that
    # trains in some phase, and the precision is timed on what trains longest (`fit` sets each
    # phase's requires_grad).
    apply_recipe(model, layers_at(train, train.epochs), train.unfreeze_blocks)
    model.to(device)
    if train.channels_last:
        model.to(memory_format=torch.channels_last)
    train_loader, sampler = make_train_loader(
        train_ds, train.batch_size, runtime.train_workers, train.seed, device
    )
    # persistent for the reason make_train_loader gives: validation runs every epoch
    val_loader = DataLoader(
        val_ds,
        batch_size=train.batch_size,
        num_workers=runtime.train_workers,
        persistent_workers=runtime.train_workers > 0,
    )
    test_loader = DataLoader(
        test_ds, batch_size=train.batch_size, num_workers=runtime.train_workers
    )

    work = path(cfg, "cache") / "train" / run_key(cfg, prepared)
    work.mkdir(parents=True, exist_ok=True)
    last = load_checkpoint(work / "last.pt") if (work / "last.pt").is_file() else None
    if last is not None:  # the precision the run started with, not a new measurement
        precision, chosen = last["meta"]["precision"], last["precision_choice"]
    else:
        precision, chosen = select_precision(
            train.precision,
            device,
            lambda: measure_precisions(
                model, *probe_batch(train_ds, train.batch_size), device, train.channels_last
            ),
            train.deterministic,
        )
    if chosen["precision_chosen_by"] == "measured":
        log.info(
            "precision: %s (forward+backward, %d images per step: fp32 %.1f images/s, "
            "bf16 autocast %.1f images/s, x%.2f; bf16 needs x%.2f)",
            precision,
            min(len(train_ds), train.batch_size),
            chosen["precision_fp32_images_per_s"],
            chosen["precision_bf16_images_per_s"],
            chosen["precision_bf16_speedup"],
            BF16_MIN_SPEEDUP,
        )

    opt = make_optimizer(param_groups(model, train), train)
    state = TrainState(
        cfg=cfg,
        work=work,
        classes=classes,
        device=device,
        model=model,
        # torch.compile of a module returns an OptimizedModule, an nn.Module wrapping it
        fwd=cast(nn.Module, torch.compile(model)) if train.compile else model,
        train_loader=train_loader,
        sampler=sampler,
        val_loader=val_loader,
        test_loader=test_loader,
        precision=precision,
        precision_choice=chosen,
        opt=opt,
        sched=make_scheduler(opt, train, len(train_loader)),
        scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
        loss_fn=nn.CrossEntropyLoss(label_smoothing=train.label_smoothing),
        meta={
            "arch": mcfg.name,
            "classes": classes,
            "mean": list(mcfg.mean),
            "std": list(mcfg.std),
            "input_size": mcfg.input_size,
            "crop_pct": mcfg.crop_pct,
            "weights_source": source,
            "precision": precision,
        },
        config=cast(dict, OmegaConf.to_container(cfg, resolve=True)),
    )
    return state, last


def splits(prepared: Path, mcfg: DictConfig) -> tuple[PreparedImages, ...]:
    """The train (augmented), val and test splits; train and val must not be empty."""
    train_ds = PreparedImages(
        prepared, "train", train_transform(mcfg.input_size, mcfg.mean, mcfg.std)
    )
    eval_tf = eval_transform(mcfg.input_size, mcfg.mean, mcfg.std, mcfg.crop_pct)
    val_ds = PreparedImages(prepared, "val", eval_tf)
    test_ds = PreparedImages(prepared, "test", eval_tf)
    if len(train_ds) == 0:
        raise InputError(f"{prepared}/train.csv has no image")
    if len(val_ds) == 0:
        raise InputError(
            f"{prepared}/val.csv has no image: raise data.split.ratios.val or "
            "data.max_images_per_class"
        )
    return train_ds, val_ds, test_ds


def resume(state: TrainState, last: dict | None) -> None:
    """Go on where the checkpoint `last` of a killed run left off: weights, optimiser,
    schedule, scaler, history, best so far and early-stopping count. Nothing without one."""
    if last is None:
        return
    state.model.load_state_dict(last["model"])
    state.opt.load_state_dict(last["optimizer"])
    state.sched.load_state_dict(last["scheduler"])
    state.scaler.load_state_dict(last["scaler"])
    state.history, state.best_loss = last["history"], last["best_val_loss"]
    state.best_epoch, state.stale = last["best_epoch"], last["stale_epochs"]
    state.start = last["epoch"] + 1
    log.info(
        "resuming from %s at epoch %d (best val loss %.4f at epoch %d)",
        state.work / "last.pt",
        state.start,
        state.best_loss,
        state.best_epoch,
    )


def count_params(model: nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def announce(state: TrainState) -> None:
    train, n_probe = state.train, probe_epochs(state.train)
    log.info(
        "%s (%s weights) on %s, %s, mode=%s%s: %d parameters",
        state.meta["arch"],
        state.meta["weights_source"],
        state.device,
        state.precision,
        train.recipe,
        f" ({n_probe} probe epochs at lr {train.probe_lr:g}, then all layers)" if n_probe else "",
        count_params(state.model),
    )


def fit(state: TrainState, tracker: StageRun) -> None:
    """Train from epoch `state.start` to `train.epochs`, or until `train.patience` epochs pass
    without a lower validation loss; after each epoch, validate, save last.pt (and best.pt when
    the loss fell) in the work folder, and log the epoch."""
    train = state.train
    layers = None
    for epoch in range(state.start, train.epochs + 1):
        if train.patience and state.stale >= train.patience:
            break
        if layers_at(train, epoch) != layers:
            layers = layers_at(train, epoch)
            apply_recipe(state.model, layers, train.unfreeze_blocks)
            log.info(
                "epoch %d: %s, %d of %d parameters train",
                epoch,
                layers,
                count_params(state.model, trainable=True),
                count_params(state.model),
            )
        state.sampler.set_epoch(epoch)
        torch.manual_seed(train.seed * 1_000_003 + epoch)  # dropout, stochastic depth
        stats = train_epoch(state, epoch)
        vloss, vpred, vtrue = predict(
            state.fwd, state.val_loader, state.device, state.precision, train.channels_last
        )
        # lr: the head's (param_groups puts its groups first)
        row = {
            "epoch": epoch,
            "train_loss": stats["train_loss"],
            "train_acc_pct": stats["train_acc_pct"],
            "val_loss": float(vloss.mean()),
            "val_acc_pct": 100 * float((vpred == vtrue).mean()),
            "lr": state.sched.get_last_lr()[0],
            "train_images": stats["train_images"],
            "train_images_per_s": stats["train_images"] / stats["train_seconds"],
            "epoch_seconds": stats["train_seconds"],
        }
        improved = state.record(row)
        ck = state.checkpoint(epoch)
        if improved:
            save_checkpoint(state.work / "best.pt", **ck)
        save_checkpoint(state.work / "last.pt", **ck)
        # `lr_head`: `train.lr` is the configured param
        tracker.log_metrics(
            {("lr_head" if k == "lr" else k): v for k, v in row.items() if k != "epoch"}, step=epoch
        )
        log.info(
            "epoch %d/%d: train loss %.4f acc %.1f%% | val loss %.4f acc %.1f%%%s | %.1f img/s",
            epoch,
            train.epochs,
            row["train_loss"],
            row["train_acc_pct"],
            row["val_loss"],
            row["val_acc_pct"],
            " (best)" if improved else "",
            row["train_images_per_s"],
        )


def probe_batch(ds: PreparedImages, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of real training images, augmented, for `measure_precisions`."""
    n = min(batch_size, len(ds))
    samples = [ds[(i, i)] for i in range(n)]
    return torch.stack([x for x, _ in samples]), torch.tensor([y for _, y in samples])


def with_interval(prefix: str, correct: int, n: int) -> dict:
    """`<prefix>_ci_low_pct`, `<prefix>_ci_high_pct`: the 95% Wilson interval of correct / n."""
    low, high = wilson(correct, n)
    return {
        f"{prefix}_ci_low_pct": round(100 * low, 2),
        f"{prefix}_ci_high_pct": round(100 * high, 2),
    }


@dataclass
class Evaluation:
    """The kept checkpoint, its test predictions and the run's metrics (train.json)."""

    best: dict
    pred: np.ndarray
    true: np.ndarray
    cm: np.ndarray
    metrics: dict


def evaluate(state: TrainState, wall: float) -> Evaluation:
    """Load the checkpoint of the lowest validation loss into the model and test it."""
    cfg, history = state.cfg, state.history
    best = load_checkpoint(state.work / "best.pt")
    state.model.load_state_dict(best["model"])
    _, pred, true = predict(state.model, state.test_loader, state.device, state.precision)
    report, cm = classification_report(pred, true, state.classes)
    epochs_run = history[-1]["epoch"] if history else 0
    train_images = sum(h["train_images"] for h in history)
    train_seconds = sum(h["epoch_seconds"] for h in history)
    at_best = next(h for h in history if h["epoch"] == best["best_epoch"])
    val_n = len(cast(Sized, state.val_loader.dataset))
    val_correct = round(at_best["val_acc_pct"] * val_n / 100)
    test_n, test_correct = int(len(true)), int(np.trace(cm))
    metrics = {
        "selected_by": best["selected_by"],
        "best_epoch": best["best_epoch"],
        "best_val_loss": round(best["best_val_loss"], 6),
        "best_val_acc_pct": at_best["val_acc_pct"],
        "val_images": val_n,
        **with_interval("val_acc", val_correct, val_n),
        "test_acc_pct": round(100 * report["accuracy"], 4),
        "test_images": test_n,
        **with_interval("test_acc", test_correct, test_n),
        "recipe": cfg.train.recipe,
        "probe_epochs": probe_epochs(cfg.train),
        "epochs_run": epochs_run,
        "epochs_configured": cfg.train.epochs,
        "batch_size": cfg.train.batch_size,
        "precision": state.precision,
        **state.precision_choice,
        "wall_time_s": round(wall, 2),
        "train_images_per_s": round(train_images / train_seconds, 2) if train_seconds else 0,
        **{f"test.{k}": v for k, v in report.items() if k != "accuracy"},
    }
    log.info(
        "test accuracy %.2f%% (%d of %d, 95%% interval %.1f-%.1f%%); checkpoint of epoch %d "
        "of %d run, by val loss %.4f (val accuracy %.2f%%, %d images)",
        metrics["test_acc_pct"],
        test_correct,
        test_n,
        metrics["test_acc_ci_low_pct"],
        metrics["test_acc_ci_high_pct"],
        metrics["best_epoch"],
        epochs_run,
        metrics["best_val_loss"],
        metrics["best_val_acc_pct"],
        val_n,
    )
    return Evaluation(best, pred, true, cm, metrics)


def write(state: TrainState, result: Evaluation, tracker: StageRun) -> None:
    """Write the kept checkpoint, train.json and the plots; log them (and the model) to MLflow."""
    cfg, classes, metrics = state.cfg, state.classes, result.metrics
    plots = path(cfg, "plots")
    save_checkpoint(path(cfg, "checkpoint"), **result.best)
    write_json(path(cfg, "metrics") / "train.json", metrics)
    write_csv(
        plots / "train_history.csv",
        HISTORY_FIELDS,
        [[h[k] for k in HISTORY_FIELDS] for h in state.history],
    )
    write_csv(
        plots / "confusion.csv",
        ["actual", "predicted"],
        [(classes[t], classes[p]) for t, p in zip(result.true, result.pred, strict=True)],
    )
    confusion_png(result.cm, classes, plots / "confusion.png")

    tracker.log_metrics(metrics)  # every accuracy in percent, as its `_pct` says
    tracker.log_dataset(cfg)
    for f in (
        path(cfg, "metrics") / "train.json",
        plots / "train_history.csv",
        plots / "confusion.csv",
        plots / "confusion.png",
    ):
        tracker.log_artifact(f)
    if cfg.runtime.log_model:
        size = cfg.model.input_size
        # Batch 2, not 1: MLflow exports the model with torch.export, which would specialise a
        # batch dimension of 1 (the 0/1 specialisation) and refuse every other batch size.
        example = torch.zeros(2, 3, size, size).normal_(generator=torch.Generator().manual_seed(0))
        tracker.log_model(state.model.cpu().eval(), example)


def confusion_png(cm: np.ndarray, classes: list[str], file: Path) -> None:
    k = len(classes)
    with figure(file, figsize=(1.2 + 0.6 * k, 1.0 + 0.6 * k), dpi=120) as ax:
        ax.imshow(cm, cmap="Blues")
        ax.set_xticks(range(k), classes, rotation=45, ha="right")
        ax.set_yticks(range(k), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    str(cm[i, j]),
                    ha="center",
                    va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black",
                )
        ax.set_title("test confusion matrix")


def main() -> None:
    cli.main("train", run)


if __name__ == "__main__":
    main()
