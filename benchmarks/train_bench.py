"""Training throughput of the default model and recipe: the real data path (JPEG decode and
augmentation in the stage's DataLoader) against batches already in memory, per worker count; and
bf16 against fp32 autocast on this CPU.

    python benchmarks/train_bench.py [--images-per-class 100] [--workers 0 1 2] [--steps 15]
        [--min-seconds 20] [--warmup 3] [--settle-steps 4] [--memory-batches 4] [--threads N]
        [--no-bf16] [--out FILE]

A mirror is generated and served on loopback, then the real `download` and `prepare` stages build
the dataset the trainer reads (short side `data.image_size`, the default 256). Each measurement
builds the model and optimiser afresh (`model=efficientnet_lite0`, bundled weights, the default
`train` recipe), runs `--warmup` untimed steps, then times at least `--steps` steps and at least
`--min-seconds` seconds of forward + backward + optimiser step; images/s = images / seconds.
The in-memory reference is measured before and after the loaders; the ratios use their mean.
Each measurement also splits its time into waiting for the next batch and the step itself: with
workers, the cost of the loader shows up in the step (the workers share the two cores).

Target (issue "The data path must not be the bottleneck"): real-loader images/s >= 0.85x the
in-memory images/s at the best worker count. bf16 vs fp32 is reported as measured, beside the
stage's own few-step timing that `train.precision=auto` decides by (bf16 only if >= 1.1x fp32):
CPU flags do not predict it (an AMX Xeon trained slower in bf16 than in fp32).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from oimirror import MirrorServer, generate
from oipipe.core.config import compose, path
from oipipe.data.datasets import PreparedImages, read_classes, train_transform
from oipipe.measure.machine import cpu_flags, cpuinfo
from oipipe.training import models
from stages import download, prepare, train

TARGET_RATIO = 0.85
Batch = tuple[torch.Tensor, torch.Tensor]
Step = Callable[[torch.Tensor, torch.Tensor], None]


# --- the machine -------------------------------------------------------------------------------


def machine() -> dict:
    flags = cpu_flags()
    return {
        "cpu_model": cpuinfo().get("model name") or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


# --- the dataset -------------------------------------------------------------------------------


def build_dataset(
    tmp: Path, images_per_class: int, seed: int, image_size: int | None
) -> tuple[DictConfig, dict]:
    """Generate + serve a mirror, then run the real download and prepare stages into tmp/run."""
    if image_size is None:  # what the pipeline stores (conf/data/default.yaml), not the mirror's
        image_size = compose(["tracking.enabled=false"]).data.image_size
    t0 = time.perf_counter()
    generate(tmp / "mirror", images_per_class=images_per_class, seed=seed)
    with MirrorServer(tmp / "mirror") as srv:
        cfg = compose(
            [
                f"paths.root={tmp / 'run'}",
                "data=mirror",
                f"data.metadata_url={srv.metadata_url}",
                f"data.images_url={srv.images_url}",
                f"data.max_images_per_class={images_per_class}",
                f"data.image_size={image_size}",
                "tracking.enabled=false",
            ]
        )
        download.run(cfg)
    prepare.run(cfg)
    prepared = path(cfg, "prepared")
    files = sorted((prepared / "images").glob("*.jpg"))
    sizes = [f.stat().st_size for f in files]
    counts = {s: len(PreparedImages(prepared, s)) for s in ("train", "val", "test")}
    return cfg, {
        "images_per_class": images_per_class,
        "seed": seed,
        "image_size": image_size,
        "classes": len(read_classes(prepared)),
        "split_images": counts,
        "mean_jpeg_kb": round(statistics.mean(sizes) / 1024, 1),
        "build_seconds": round(time.perf_counter() - t0, 1),
    }


# --- the training step -------------------------------------------------------------------------


def make_step(
    cfg: DictConfig, num_classes: int, device: torch.device, precision: str, steps_per_epoch: int
) -> tuple[Step, nn.Module]:
    """A fresh model + optimiser + schedule as `train.run` builds them, and one training step
    doing what `train.train_epoch` does per batch."""
    tcfg, mcfg = cfg.train, cfg.model
    model, _ = models.build(mcfg.name, num_classes, mcfg.weights)
    # the recipe's last phase (lp_ft: all layers), the one that trains longest
    train.apply_recipe(model, train.layers_at(tcfg, tcfg.epochs), tcfg.unfreeze_blocks)
    model.to(device)
    if tcfg.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = train.make_optimizer(train.param_groups(model, tcfg), tcfg)
    sched = train.make_scheduler(opt, tcfg, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    loss_fn = nn.CrossEntropyLoss(label_smoothing=tcfg.label_smoothing)
    params = [p for g in opt.param_groups for p in g["params"]]
    model.train()
    train.freeze_frozen_norms(model)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if tcfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with train.autocast(device, precision):
            logits = model(x)
            loss = loss_fn(logits.float(), y)
        if not torch.isfinite(loss):
            raise train.TrainingDiverged(f"loss is {loss.item()}")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if tcfg.grad_clip > 0:
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        sched.step()
        # the stage's per-step bookkeeping (two host syncs)
        loss.item()
        (logits.argmax(1) == y).sum().item()

    return step, model


def timed(
    batches: Iterator[Batch], step: Step, warmup: int, steps: int, min_seconds: float
) -> dict:
    """Untimed warm-up, then at least `steps` steps and `min_seconds` seconds, fetch included."""
    for _ in range(warmup):
        step(*next(batches))
    n = images = 0
    per_step, waits = [], []
    t0 = last = time.perf_counter()
    while n < steps or last - t0 < min_seconds:
        x, y = next(batches)
        fetched = time.perf_counter()
        step(x, y)
        now = time.perf_counter()
        per_step.append(now - last)
        waits.append(fetched - last)
        last = now
        n += 1
        images += len(y)
    seconds = last - t0
    slowest = max(range(n), key=per_step.__getitem__)
    return {
        "steps": n,
        "images": images,
        "seconds": round(seconds, 2),
        "images_per_s": round(images / seconds, 3),
        # time blocked on the next batch vs in the step itself (compute, and whatever the
        # loader's processes take from it)
        "data_wait_s": round(sum(waits), 2),
        "compute_s": round(seconds - sum(waits), 2),
        "step_s_median": round(statistics.median(per_step), 3),
        "step_s_min": round(min(per_step), 3),
        "step_s_max": round(per_step[slowest], 3),
        "slowest_step": slowest + 1,
    }


# --- the batch sources -------------------------------------------------------------------------


def real_batches(
    ds: PreparedImages, cfg: DictConfig, workers: int, device: torch.device
) -> Iterator[Batch]:
    """Epoch after epoch from the stage's own training loader (`train.make_train_loader`)."""
    loader, sampler = train.make_train_loader(
        ds, cfg.train.batch_size, workers, cfg.train.seed, device
    )
    epoch = 0
    while True:
        epoch += 1
        sampler.set_epoch(epoch)
        torch.manual_seed(cfg.train.seed * 1_000_003 + epoch)
        yield from loader


def memory_batches(ds: PreparedImages, batch_size: int, k: int, seed: int) -> list[Batch]:
    """K batches through the same decode + train_transform once, kept in RAM."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(ds), (k * batch_size,), generator=g).tolist()
    torch.manual_seed(seed)
    samples = [ds[i] for i in idx]
    out = []
    for b in range(k):
        chunk = samples[b * batch_size : (b + 1) * batch_size]
        out.append(
            (
                torch.stack([x for x, _ in chunk]),
                torch.tensor([y for _, y in chunk], dtype=torch.long),
            )
        )
    return out


def cycle(batches: list[Batch]) -> Iterator[Batch]:
    while True:
        yield from batches


def loader_only(
    ds: PreparedImages, cfg: DictConfig, workers: int, device: torch.device, min_seconds: float
) -> dict:
    """The data path alone (no training): how fast it can feed, worker start-up included."""
    batches = real_batches(ds, cfg, workers, device)
    images, t0 = 0, time.perf_counter()
    try:
        while images < len(ds) or time.perf_counter() - t0 < min_seconds:
            images += len(next(batches)[1])
    finally:
        batches.close()
    seconds = time.perf_counter() - t0
    return {
        "images": images,
        "seconds": round(seconds, 2),
        "images_per_s": round(images / seconds, 1),
        "ms_per_image": round(1000 * seconds / images, 2),
    }


# --- the benchmark -----------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[train_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def measure(
    label: str,
    cfg: DictConfig,
    num_classes: int,
    device: torch.device,
    precision: str,
    steps_per_epoch: int,
    make_batches: Callable[[], Iterator[Batch]],
    args: argparse.Namespace,
) -> dict:
    gc.collect()
    step, model = make_step(cfg, num_classes, device, precision, steps_per_epoch)
    batches = make_batches()
    try:
        r = timed(batches, step, args.warmup, args.steps, args.min_seconds)
    finally:
        if hasattr(batches, "close"):
            batches.close()  # shuts the loader's workers down
        del step, model
    log(f"{label}: {r['images_per_s']} images/s ({r['steps']} steps, {r['seconds']} s)")
    return r


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--images-per-class", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0, help="mirror seed")
    ap.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="data.image_size of the prepared images (default: the config's, 256)",
    )
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per measurement")
    ap.add_argument(
        "--settle-steps",
        type=int,
        default=4,
        help="untimed steps on a throwaway model before the first measurement",
    )
    ap.add_argument("--steps", type=int, default=15, help="at least this many timed steps")
    ap.add_argument("--min-seconds", type=float, default=20.0, help="and at least this long")
    ap.add_argument("--memory-batches", type=int, default=4, help="in-memory batches cycled")
    ap.add_argument(
        "--loader-seconds",
        type=float,
        default=5.0,
        help="data-path-only measurement: at least one epoch and this long",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads for every measurement (default: torch's)",
    )
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16 vs fp32 comparison")
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    wall0 = time.perf_counter()
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="train_bench-") as tmp:
        log("building the prepared dataset (generate, download, prepare)")
        cfg, dataset = build_dataset(Path(tmp), args.images_per_class, args.seed, args.image_size)
        prepared = path(cfg, "prepared")
        num_classes = len(read_classes(prepared))
        mcfg, tcfg = cfg.model, cfg.train
        device = train.select_device(tcfg.device)
        ds = PreparedImages(
            prepared, "train", train_transform(mcfg.input_size, mcfg.mean, mcfg.std)
        )
        bs = tcfg.batch_size
        steps_per_epoch = len(ds) // bs if len(ds) > bs else 1

        def stage_probe() -> dict[str, float]:
            """The stage's own quick timing (train.precision=auto) on a fresh model."""
            _, model = make_step(cfg, num_classes, device, "fp32", steps_per_epoch)
            return train.measure_precisions(
                model, *train.probe_batch(ds, bs), device, tcfg.channels_last
            )

        precision, chosen = train.select_precision(
            tcfg.precision, device, stage_probe, tcfg.deterministic
        )
        log(
            f"{len(ds)} train images, {steps_per_epoch} batches of {bs} per epoch; "
            f"{mcfg.name} on {device}, {precision}, {torch.get_num_threads()} threads"
        )

        data_only = {}
        for w in args.workers:
            data_only[f"workers_{w}"] = loader_only(ds, cfg, w, device, args.loader_seconds)
            log(
                f"data path alone, {w} workers: {data_only[f'workers_{w}']['images_per_s']} "
                "images/s"
            )

        mem = memory_batches(ds, bs, args.memory_batches, tcfg.seed)
        if args.settle_steps:
            # A process's first training steps run slower (allocator, oneDNN primitive caches)
            # whatever model they train: settle here so the first measurement is not penalised.
            step, _ = make_step(cfg, num_classes, device, precision, steps_per_epoch)
            batches = cycle(mem)
            for _ in range(args.settle_steps):
                step(*next(batches))
            del step, _
            log(f"settled ({args.settle_steps} untimed steps)")

        def in_memory_run(label: str, prec: str = precision) -> dict:
            return measure(
                label, cfg, num_classes, device, prec, steps_per_epoch, lambda: cycle(mem), args
            )

        # The reference is measured before and after the loaders, their mean used: a drift of
        # the machine's speed over the run then biases no ratio in one direction.
        mem_before = in_memory_run("in-memory (before)")

        def real(w: int) -> Callable[[], Iterator[Batch]]:
            return lambda: real_batches(ds, cfg, w, device)

        loaders: dict[str, dict] = {}
        for w in args.workers:
            key = f"workers_{w}"
            r = measure(
                f"real loader, {key}",
                cfg,
                num_classes,
                device,
                precision,
                steps_per_epoch,
                real(w),
                args,
            )
            r.update(num_workers=w)
            loaders[key] = r
        mem_after = in_memory_run("in-memory (after)")
        reference = (mem_before["images_per_s"] + mem_after["images_per_s"]) / 2
        in_memory = {
            "images_per_s": round(reference, 3),
            "after_vs_before": round(mem_after["images_per_s"] / mem_before["images_per_s"], 3),
            "before": mem_before,
            "after": mem_after,
        }
        for r in loaders.values():
            r["ratio_vs_in_memory"] = round(r["images_per_s"] / reference, 3)
        best_key = max(loaders, key=lambda k: loaders[k]["ratio_vs_in_memory"])
        stage_key = f"workers_{cfg.runtime.train_workers}"

        # the stage's few-step decision beside this benchmark's longer comparison below
        bf16: dict = {"stage_precision": precision, "stage_choice": chosen}
        if not args.no_bf16:
            # fp32: the in-memory run just before (same loop, adjacent in time)
            fp32 = mem_after if precision == "fp32" else in_memory_run("in-memory fp32", "fp32")
            b = in_memory_run("in-memory bf16 autocast", "bf16")
            bf16.update(
                fp32=fp32, bf16=b, bf16_vs_fp32=round(b["images_per_s"] / fp32["images_per_s"], 3)
            )

    result = {
        "machine": machine(),
        "dataset": dataset,
        "setup": {
            "model": mcfg.name,
            "weights": mcfg.weights,
            "input_size": mcfg.input_size,
            "recipe": tcfg.recipe,
            "optimizer": tcfg.optimizer,
            "batch_size": bs,
            "channels_last": tcfg.channels_last,
            "device": str(device),
            "precision": precision,
            "torch_threads": torch.get_num_threads(),
            "settle_steps": args.settle_steps,
            "warmup_steps": args.warmup,
            "min_steps": args.steps,
            "min_seconds": args.min_seconds,
            "memory_batches": args.memory_batches,
            "train_images": len(ds),
            "steps_per_epoch": steps_per_epoch,
        },
        "data_path_only": data_only,
        "in_memory": in_memory,
        "real_loader": loaders,
        "best": {
            "config": best_key,
            "num_workers": loaders[best_key]["num_workers"],
            "ratio": loaders[best_key]["ratio_vs_in_memory"],
            "target": TARGET_RATIO,
            "met": loaders[best_key]["ratio_vs_in_memory"] >= TARGET_RATIO,
        },
        "stage_default_workers": {
            "num_workers": cfg.runtime.train_workers,
            "ratio": loaders.get(stage_key, {}).get("ratio_vs_in_memory"),
        },
        "bf16_vs_fp32": bf16,
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "wall_seconds": round(time.perf_counter() - wall0, 1),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
