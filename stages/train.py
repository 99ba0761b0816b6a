"""Stage `train`: fine-tune a pretrained model on the prepared subset (transfer learning).

Writes the best checkpoint by validation accuracy to `paths.models/model.pt` (weights, optimiser,
scheduler, scaler, epoch, best metric, resolved config, and what inference needs: architecture,
class names, normalisation, input size), `paths.metrics/train.json`, and the DVC plots
`paths.plots/train_history.csv`, `confusion.csv` and `confusion.png`.

While it runs, a complete checkpoint of the last epoch sits in a work folder under `paths.cache`
keyed by everything that defines the run; a killed run started again with the same config and
data resumes there and finishes with the same epochs (and, with `train.deterministic`, the same
numbers) as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from stages import models
from stages.config import InputError, StageError, main_for, path
from stages.datasets import (
    PreparedImages,
    SeededSampler,
    eval_transform,
    read_classes,
    train_transform,
)
from stages.io import atomic_open, write_csv, write_json
from stages.tracking import stage_run

log = logging.getLogger("stages.train")

CHECKPOINT = "model.pt"
HISTORY_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr",
                  "train_images", "train_images_per_s", "epoch_seconds"]


class TrainingDiverged(StageError):
    """The loss became NaN or infinite."""


# --- hardware choices --------------------------------------------------------------------------


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: without them bf16 matmuls are emulated and slower than fp32
    (measured on an AVX-512 Xeon without either: 1024^2 matmul 47 ms bf16 vs 14 ms fp32)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def select_device(want: str) -> torch.device:
    if want == "cuda" and not torch.cuda.is_available():
        raise InputError("train.device=cuda but no CUDA device is available; use auto or cpu")
    return torch.device("cuda" if want in ("auto", "cuda") and torch.cuda.is_available()
                        else "cpu")


def select_precision(want: str, device: torch.device) -> str:
    if want == "auto":
        if device.type == "cuda":
            return "fp16"
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if want == "fp16" and device.type != "cuda":
        raise InputError("train.precision=fp16 needs CUDA; on CPU use bf16 or fp32")
    return want


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# --- recipes -----------------------------------------------------------------------------------


def apply_recipe(model: nn.Module, mode: str, unfreeze_blocks: int) -> None:
    """Set requires_grad for `train.mode`: the head always trains."""
    head = model.get_submodule(models.head_name(model))
    if mode == "full":
        model.requires_grad_(True)
        return
    model.requires_grad_(False)
    head.requires_grad_(True)
    if mode == "partial":
        stages_ = models.blocks(model)
        if unfreeze_blocks > len(stages_):
            raise InputError(f"train.unfreeze_blocks={unfreeze_blocks} but {type(model).__name__}"
                             f" has {len(stages_)} blocks")
        for block in stages_[-unfreeze_blocks:]:
            block.requires_grad_(True)


def freeze_frozen_norms(model: nn.Module) -> None:
    """Keep batch-norm statistics of frozen layers fixed (train() would update them)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(
                p.requires_grad for p in m.parameters()):
            m.eval()


def param_groups(model: nn.Module, train: DictConfig) -> list[dict]:
    """Head at `lr`, backbone at `lr * backbone_lr_scale`; no weight decay on biases/norms."""
    head = models.head_name(model) + "."
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((name.startswith(head), p.ndim > 1), []).append(p)
    return [{"params": ps, "lr": train.lr * (1.0 if is_head else train.backbone_lr_scale),
             "weight_decay": train.weight_decay if decay else 0.0}
            for (is_head, decay), ps in groups.items()]


def make_optimizer(groups: list[dict], train: DictConfig) -> torch.optim.Optimizer:
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=train.lr)


def make_scheduler(opt: torch.optim.Optimizer, warmup: int, total: int,
                   min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup` steps, then cosine to `min_ratio` at `total` steps."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


# --- loops -------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_epoch(model, loader, opt, sched, scaler, loss_fn, device, precision, train, epoch,
                channels_last) -> dict:
    model.train()
    freeze_frozen_norms(model)
    loss_sum, correct, seen, t0 = 0.0, 0, 0, time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch}", unit="batch", leave=False)
    for step, (x, y) in enumerate(bar, start=1):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            logits = model(x)
            loss = loss_fn(logits.float(), y)
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"loss is {loss.item()} at epoch {epoch}, step {step}: training diverged. Lower "
                "train.lr, keep train.grad_clip on, or check the weights and the data")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if train.grad_clip > 0:
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(
                [p for g in opt.param_groups for p in g["params"]], train.grad_clip)
        scaler.step(opt)
        scaler.update()
        sched.step()
        n = y.numel()
        loss_sum += loss.item() * n
        correct += (logits.argmax(1) == y).sum().item()
        seen += n
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}",
                        img_s=f"{seen / (time.perf_counter() - t0):.1f}", refresh=False)
    dt = time.perf_counter() - t0
    return {"train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
            "train_images": seen, "train_seconds": dt}


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


def classification_report(preds: np.ndarray, targets: np.ndarray,
                          classes: list[str]) -> tuple[dict, np.ndarray]:
    k = len(classes)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (targets, preds), 1)
    report: dict[str, Any] = {"accuracy": float(np.trace(cm) / max(cm.sum(), 1))}
    for i, name in enumerate(classes):
        tp = cm[i, i]
        report[f"{name}.precision"] = float(tp / cm[:, i].sum()) if cm[:, i].sum() else 0.0
        report[f"{name}.recall"] = float(tp / cm[i, :].sum()) if cm[i, :].sum() else 0.0
    return report, cm


def make_train_loader(ds: PreparedImages, batch_size: int, num_workers: int, seed: int,
                      device: torch.device) -> tuple[DataLoader, SeededSampler]:
    """The training loader; call `sampler.set_epoch(e)` before each epoch.

    Each epoch's order and augmentation are a function of (seed, epoch) alone, so a resumed run
    replays exactly what an uninterrupted one does, and the workers can live across epochs:
    re-forking them every epoch from a multi-GB training process costs seconds of
    copy-on-write faults on the next step (measured: ratio to in-memory 0.81 instead of 0.94).
    """
    sampler = SeededSampler(len(ds), seed)
    loader = DataLoader(ds, batch_size=batch_size, sampler=sampler,
                        drop_last=len(ds) > batch_size, num_workers=num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=num_workers > 0)
    return loader, sampler


# --- checkpoints -------------------------------------------------------------------------------


def save_checkpoint(file: Path, **state: Any) -> None:
    with atomic_open(file, "wb") as f:
        torch.save(state, f)


def load_checkpoint(file: Path) -> dict:
    return torch.load(file, map_location="cpu", weights_only=True)


# Knobs that change how a run goes or what MLflow receives, not its result.
NOT_RESULT_KEYS = ("num_workers", "system_metrics", "log_model")


def run_key(cfg: DictConfig, prepared: Path) -> str:
    """What defines a training run: model, recipe and the exact prepared data."""
    recipe = {k: v for k, v in OmegaConf.to_container(cfg.train).items()
              if k not in NOT_RESULT_KEYS}
    blob = json.dumps({"model": OmegaConf.to_container(cfg.model), "train": recipe},
                      sort_keys=True).encode()
    h = hashlib.sha256(blob)
    for split in ("train", "val", "labels"):
        f = prepared / (f"{split}.csv" if split != "labels" else "labels.txt")
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


# --- the stage ---------------------------------------------------------------------------------


def run(cfg: DictConfig) -> dict:
    """Fine-tune `model.name` on the prepared data; returns the metrics it wrote."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        return _run(cfg)
    finally:  # a process-wide switch: leave it as the caller had it (tests, sweeps in-process)
        torch.use_deterministic_algorithms(was_deterministic)


def _run(cfg: DictConfig) -> dict:
    train, mcfg = cfg.train, cfg.model
    prepared = path(cfg, "prepared")
    classes = read_classes(prepared)
    device = select_device(train.device)
    precision = select_precision(train.precision, device)
    if train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    seed_everything(train.seed)

    train_ds = PreparedImages(prepared, "train",
                              train_transform(mcfg.input_size, mcfg.mean, mcfg.std))
    eval_tf = eval_transform(mcfg.input_size, mcfg.mean, mcfg.std, mcfg.crop_pct)
    val_ds = PreparedImages(prepared, "val", eval_tf)
    test_ds = PreparedImages(prepared, "test", eval_tf)
    if len(train_ds) == 0:
        raise InputError(f"{prepared}/train.csv has no image")
    if len(val_ds) == 0:
        raise InputError(f"{prepared}/val.csv has no image: raise data.split.ratios.val or "
                         "data.max_images_per_class")

    model, source = models.build(mcfg.name, len(classes), mcfg.weights)
    apply_recipe(model, train.mode, train.unfreeze_blocks)
    model.to(device)
    if train.channels_last:
        model.to(memory_format=torch.channels_last)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    train_loader, sampler = make_train_loader(train_ds, train.batch_size, train.num_workers,
                                              train.seed, device)
    # persistent for the reason make_train_loader gives: validation runs every epoch
    val_loader = DataLoader(val_ds, batch_size=train.batch_size, num_workers=train.num_workers,
                            persistent_workers=train.num_workers > 0)
    test_loader = DataLoader(test_ds, batch_size=train.batch_size, num_workers=train.num_workers)

    opt = make_optimizer(param_groups(model, train), train)
    steps = len(train_loader)
    sched = make_scheduler(opt, train.warmup_epochs * steps, train.epochs * steps,
                           train.min_lr_ratio)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    loss_fn = nn.CrossEntropyLoss(label_smoothing=train.label_smoothing)
    fwd = torch.compile(model) if train.compile else model

    work = path(cfg, "cache") / "train" / run_key(cfg, prepared)
    work.mkdir(parents=True, exist_ok=True)
    meta = {"arch": mcfg.name, "classes": classes, "mean": list(mcfg.mean),
            "std": list(mcfg.std), "input_size": mcfg.input_size, "crop_pct": mcfg.crop_pct,
            "weights_source": source, "precision": precision}
    resolved = OmegaConf.to_container(cfg, resolve=True)
    history: list[dict] = []
    start, best_acc, best_epoch, stale = 1, -1.0, 0, 0
    if (work / "last.pt").is_file():
        ck = load_checkpoint(work / "last.pt")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        history, best_acc, best_epoch = ck["history"], ck["best_acc"], ck["best_epoch"]
        stale, start = ck["stale_epochs"], ck["epoch"] + 1
        log.info("resuming from %s at epoch %d (best val acc %.4f at epoch %d)",
                 work / "last.pt", start, best_acc, best_epoch)

    log.info("%s (%s weights) on %s, %s, mode=%s: %d of %d parameters train", mcfg.name, source,
             device, precision, train.mode, trainable, total)
    wall0 = time.perf_counter()
    with stage_run(cfg, "train", system_metrics=train.system_metrics) as tracker:
        tracker.log_params({"model": OmegaConf.to_container(mcfg),
                            "train": OmegaConf.to_container(train),
                            "train.resolved_precision": precision,
                            "train.device_resolved": str(device),
                            "train.trainable_params": trainable})
        for epoch in range(start, train.epochs + 1):
            if train.patience and stale >= train.patience:
                break
            sampler.set_epoch(epoch)
            torch.manual_seed(train.seed * 1_000_003 + epoch)  # dropout, stochastic depth
            stats = train_epoch(fwd, train_loader, opt, sched, scaler, loss_fn, device,
                                precision, train, epoch, train.channels_last)
            vloss, vpred, vtrue = predict(fwd, val_loader, device, precision,
                                          train.channels_last)
            row = {"epoch": epoch, "train_loss": stats["train_loss"],
                   "train_acc": stats["train_acc"], "val_loss": float(vloss.mean()),
                   "val_acc": float((vpred == vtrue).mean()), "lr": sched.get_last_lr()[0],
                   "train_images": stats["train_images"],
                   "train_images_per_s": stats["train_images"] / stats["train_seconds"],
                   "epoch_seconds": stats["train_seconds"]}
            history.append(row)
            improved = row["val_acc"] > best_acc
            if improved:
                best_acc, best_epoch, stale = row["val_acc"], epoch, 0
            else:
                stale += 1
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                     "epoch": epoch, "best_acc": best_acc, "best_epoch": best_epoch,
                     "stale_epochs": stale, "history": history, "config": resolved,
                     "meta": meta}
            if improved:
                save_checkpoint(work / "best.pt", **state)
            save_checkpoint(work / "last.pt", **state)
            tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
            log.info("epoch %d/%d: train loss %.4f acc %.3f | val loss %.4f acc %.3f | %.1f img/s",
                     epoch, train.epochs, row["train_loss"], row["train_acc"], row["val_loss"],
                     row["val_acc"], row["train_images_per_s"])
        wall = time.perf_counter() - wall0
        metrics = finish(cfg, work, classes, test_loader, device, precision, history, wall,
                         tracker, model)
    shutil.rmtree(work, ignore_errors=True)
    return metrics


def finish(cfg, work, classes, test_loader, device, precision, history, wall, tracker,
           model) -> dict:
    """Evaluate the best checkpoint on test; write checkpoint, metrics, plots; log to MLflow."""
    best = load_checkpoint(work / "best.pt")
    model.load_state_dict(best["model"])
    _, pred, true = predict(model, test_loader, device, precision)
    report, cm = classification_report(pred, true, classes)
    epochs_run = history[-1]["epoch"] if history else 0
    train_images = sum(h["train_images"] for h in history)
    train_seconds = sum(h["epoch_seconds"] for h in history)
    metrics = {"best_val_acc": best["best_acc"], "best_epoch": best["best_epoch"],
               "test_acc": report["accuracy"], "epochs_run": epochs_run,
               "epochs_configured": cfg.train.epochs, "batch_size": cfg.train.batch_size,
               "wall_time_s": round(wall, 2),
               "train_images_per_s": round(train_images / train_seconds, 2) if train_seconds else 0,
               "test_images": int(len(true)),
               **{f"test.{k}": v for k, v in report.items() if k != "accuracy"}}

    models_dir, plots = path(cfg, "models"), path(cfg, "plots")
    save_checkpoint(models_dir / CHECKPOINT, **best)
    write_json(path(cfg, "metrics") / "train.json", metrics)
    write_csv(plots / "train_history.csv", HISTORY_FIELDS,
              [[h[k] for k in HISTORY_FIELDS] for h in history])
    write_csv(plots / "confusion.csv", ["actual", "predicted"],
              [(classes[t], classes[p]) for t, p in zip(true, pred, strict=True)])
    confusion_png(cm, classes, plots / "confusion.png")
    log.info("test accuracy %.4f (best val %.4f at epoch %d of %d run)", metrics["test_acc"],
             metrics["best_val_acc"], metrics["best_epoch"], epochs_run)

    tracker.log_metrics(metrics)
    for f in (path(cfg, "metrics") / "train.json", plots / "train_history.csv",
              plots / "confusion.csv", plots / "confusion.png"):
        tracker.log_artifact(f)
    if cfg.train.log_model:
        size = cfg.model.input_size
        # Batch 2, not 1: MLflow exports the model with torch.export, which would specialise a
        # batch dimension of 1 (the 0/1 specialisation) and refuse every other batch size.
        example = torch.zeros(2, 3, size, size).normal_(generator=torch.Generator().manual_seed(0))
        tracker.log_model(model.cpu().eval(), example)
    return metrics


def confusion_png(cm: np.ndarray, classes: list[str], file: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * k, 1.0 + 0.6 * k), dpi=120)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_title("test confusion matrix")
    fig.tight_layout()
    with atomic_open(file, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def main() -> None:
    main_for("train", run)


if __name__ == "__main__":
    main()
