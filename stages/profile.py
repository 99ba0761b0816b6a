"""Stage `profile`: where the inference time goes, per operator type, and why fewer FLOPs need not
mean less time.

Each recorded event's self CPU time goes to the type (`measure.optypes`) of its outermost
ancestor that the registry knows, so the children of `aten::conv2d` (`mkldnn_convolution`,
`empty`...) count as convolution; a depthwise convolution is told apart by its weight's shape.
Time in no known op goes to `fused (compiled kernels)` inside a compiled graph, else to `other`.
FLOPs and bytes come from one eager call under a `TorchDispatchMode`, which sees every aten op
(functional adds and multiplies included, which module hooks miss); convolution and matmul FLOPs
as `torch.utils.flop_counter` counts them. Modes, outputs and settings: docs/stages/profile.md.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.profiler import ProfilerActivity, profile, record_function

from oipipe.core import cli
from oipipe.core.config import path
from oipipe.core.errors import InputError
from oipipe.core.files import write_csv, write_json
from oipipe.core.tracking import stage_run
from oipipe.deploy.runtime import Runtime, eager_runtime, torch_runtime
from oipipe.measure import evaluation, optypes
from oipipe.measure.opcount import OpCounter
from oipipe.reporting.plots import figure
from oipipe.training import models

log = logging.getLogger("stages.profile")

MARKER = "profile::forward"
CSV_COLUMNS = [
    "mode",
    "batch",
    "type",
    "time_ms",
    "time_share_pct",
    "flops",
    "flop_share_pct",
    "gflops_per_s",
    "bytes",
    "intensity",
]


# --- FLOPs and bytes per type: one call under a dispatch mode ------------------------------------


def count(runtime: Runtime, x: torch.Tensor) -> tuple[dict[str, float], dict[str, float]]:
    """One call's FLOPs and bytes per type."""
    inputs = runtime.prepare(x)
    with OpCounter() as counter:
        runtime.call(inputs)
    return dict(counter.flops), dict(counter.bytes)


# --- time per type: torch.profiler --------------------------------------------------------------


def event_type(event: Any) -> str:
    """The type whose time an event's self time is: its outermost known ancestor's (itself
    included), else fused if it runs inside a compiled graph, else other."""
    kind, compiled, e = None, False, event
    while e is not None and e.name != MARKER:
        kind = optypes.op_type(e.name, e.input_shapes) or kind
        compiled = compiled or optypes.is_compiled_wrapper(e.name)
        e = e.cpu_parent
    return kind or (optypes.FUSED if compiled else optypes.OTHER)


def time_by_type(
    runtime: Runtime, x: torch.Tensor, iterations: int, warmup: int
) -> tuple[dict[str, float], float]:
    """Seconds of self CPU time per type over `iterations` profiled calls, and the calls' total
    (the marker's CPU time: every event inside is in exactly one type)."""
    inputs = runtime.prepare(x)
    for _ in range(warmup):
        runtime.call(inputs)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(iterations):
            with record_function(MARKER):
                runtime.call(inputs)
    seconds: dict[str, float] = defaultdict(float)
    total = 0.0
    for e in prof.events():
        if e.name == MARKER:
            total += e.cpu_time_total / 1e6
            seconds[optypes.OTHER] += e.self_cpu_time_total / 1e6
            continue
        p = e.cpu_parent
        while p is not None and p.name != MARKER:
            p = p.cpu_parent
        if p is not None:  # inside a profiled call
            seconds[event_type(e)] += e.self_cpu_time_total / 1e6
    return dict(seconds), total


def profile_runtime(
    runtime: Runtime,
    x: torch.Tensor,
    flops: dict[str, float],
    nbytes: dict[str, float],
    iterations: int,
    warmup: int,
) -> dict:
    seconds, total = time_by_type(runtime, x, iterations, warmup)
    if runtime_is_compiled(seconds):
        # Inside compiled kernels batch norm, activations, adds and pooling are fused: their
        # FLOPs and bytes belong to the fused type.
        flops, nbytes = _fold(flops), _fold(nbytes)
    return {
        "total_ms": total / iterations * 1000,
        "iterations": iterations,
        "types": optypes.summarize(seconds, flops, nbytes, iterations),
    }


def runtime_is_compiled(seconds: dict[str, float]) -> bool:
    return seconds.get(optypes.FUSED, 0.0) > 0


def _fold(values: dict[str, float]) -> dict[str, float]:
    fusible = (
        optypes.BATCH_NORM,
        optypes.ACTIVATION,
        optypes.ELEMENTWISE,
        optypes.POOLING,
        optypes.LAYOUT,
    )
    out = {k: v for k, v in values.items() if k not in fusible}
    out[optypes.FUSED] = out.get(optypes.FUSED, 0.0) + sum(values.get(k, 0.0) for k in fusible)
    return out


# --- modes ---------------------------------------------------------------------------------------


def eager(model: torch.nn.Module) -> Runtime:
    return eager_runtime(model, "cpu")


def inductor(model: torch.nn.Module) -> Runtime:
    rt = eager_runtime(model, "cpu")  # channels_last weights, and its input preparation
    compiled = torch_runtime(torch.compile(model, backend="inductor", dynamic=False))
    compiled.prepare = rt.prepare
    return compiled


MODES: dict[str, Callable[[torch.nn.Module], Runtime]] = {"eager": eager, "inductor": inductor}


def mode_runtime(name: str, model: torch.nn.Module) -> Runtime:
    if name not in MODES:
        raise ValueError(f"unknown profile mode {name!r}; expected one of {sorted(MODES)}")
    return MODES[name](model)


# --- the stage -----------------------------------------------------------------------------------


def profile_model(
    model: torch.nn.Module,
    images: torch.Tensor,
    modes: list[str],
    batch_sizes: list[int],
    iterations: int,
    warmup: int,
) -> dict:
    """The profile dict for `model` (the stage's metrics without the file bookkeeping)."""
    profiles = {}
    counts = {}
    baseline = eager(model)
    for b in batch_sizes:
        counts[b] = count(baseline, evaluation.fill(images, b))
    for mode in modes:
        rt = mode_runtime(mode, model)
        for b in batch_sizes:
            log.info("profiling %s at batch %d (%d calls)", mode, b, iterations)
            p = profile_runtime(rt, evaluation.fill(images, b), *counts[b], iterations, warmup)
            profiles[f"{mode}@b{b}"] = {"mode": mode, "batch": b, **p}
    result = {"threads": torch.get_num_threads(), "profiles": profiles}
    result["memory_bound"] = {k: optypes.memory_bound(p["types"]) for k, p in profiles.items()}
    result["paragraph"] = optypes.paragraph(result)
    return result


def csv_rows(result: dict) -> list[list]:
    return [
        [p["mode"], p["batch"], kind, *(v[c] for c in CSV_COLUMNS[3:])]
        for p in result["profiles"].values()
        for kind, v in p["types"].items()
    ]


def chart(result: dict, file: Path) -> None:
    """Time share against FLOP share per type, one panel per mode and batch size."""
    import numpy as np

    profiles = list(result["profiles"].values())
    kinds = [k for k in optypes.TYPES if any(k in p["types"] for p in profiles)]
    with figure(
        file,
        1,
        len(profiles),
        squeeze=False,
        sharey=True,
        figsize=(4.5 * len(profiles), 1 + 0.45 * len(kinds)),
    ) as axes:
        ys = np.arange(len(kinds))
        for ax, p in zip(axes[0], profiles, strict=True):
            for shift, key in ((-0.2, "time_share_pct"), (0.2, "flop_share_pct")):
                ax.barh(
                    ys + shift,
                    [p["types"].get(k, {}).get(key, 0.0) for k in kinds],
                    height=0.4,
                    label=key.removesuffix("_pct").replace("_", " ").replace("flop", "FLOP"),
                )
            ax.set_yticks(ys, kinds)
            ax.invert_yaxis()
            ax.set_xlabel("%")
            ax.set_title(f"{p['mode']}, batch {p['batch']} ({p['total_ms']:.1f} ms)")
            ax.legend(fontsize=7)


def run(cfg: DictConfig) -> dict:
    """Profile the trained model per operator type; write profile.json, .csv and .png."""
    pc = cfg.profile
    model, meta = models.load_trained(path(cfg, "checkpoint"))
    images, _ = evaluation.images(path(cfg, "prepared"), cfg.optimize.eval_splits, meta)
    if len(images) == 0:
        raise InputError(f"{path(cfg, 'prepared')}: no held-out image to profile on")
    if pc.threads:
        torch.set_num_threads(pc.threads)
    result = {
        "model": meta["arch"],
        "input_size": meta["input_size"],
        "inductor": "torch.compile(backend='inductor', dynamic=False) of the channels_last "
        "eager model",
        **profile_model(
            model, images, list(pc.modes), list(pc.batch_sizes), pc.iterations, pc.warmup
        ),
    }
    metrics, plots = path(cfg, "metrics") / "profile.json", path(cfg, "plots")
    write_json(metrics, result)
    write_csv(plots / "profile.csv", CSV_COLUMNS, csv_rows(result))
    chart(result, plots / "profile.png")
    with stage_run(cfg, "profile") as tracker:
        tracker.log_params({"profile": {k: str(v) for k, v in pc.items()}})
        # MLflow metric names allow letters, digits, _-. / and spaces: no "@" or "()"
        slug = lambda s: re.sub(r"[^A-Za-z0-9_]+", "_", s).strip("_")  # noqa: E731
        tracker.log_metrics(
            {
                slug(k): {
                    f"{slug(t)}_time_share_pct": v["time_share_pct"] for t, v in p["types"].items()
                }
                for k, p in result["profiles"].items()
            }
        )
        for f in (metrics, plots / "profile.png"):
            tracker.log_artifact(f)
    log.info("%s", result["paragraph"])
    return result


def main() -> None:
    cli.main("profile", run)


if __name__ == "__main__":
    main()
