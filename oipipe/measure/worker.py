"""The benchmark's worker: one variant at every batch size of the protocol, in a fresh process
of its own (one crash loses nothing else; no variant inherits another's warm caches or threads).

    python -m oipipe.measure.worker --variant NAME --rows FILE --params PARAMS

The benchmark stage starts it once per variant (`stages.benchmark.run_worker`) and follows its
progress lines on stdout; each finished row is one JSON line appended to FILE. It is internal:
nothing else needs to run it.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import resource
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import DictConfig, OmegaConf

from oipipe.core import cli
from oipipe.core.config import load_params, path
from oipipe.core.errors import error_text
from oipipe.deploy.runtime import RECORD, Runtime, load_artifact
from oipipe.measure import evaluation
from oipipe.measure.power import PowerReadError, cuda_pci_bus_id, nvml_sampler
from oipipe.measure.timing import (
    check_inputs,
    check_outputs,
    rotated_batches,
    time_openvino_async,
    time_processes,
    time_runtime,
)
from oipipe.training import models

log = logging.getLogger("oipipe.measure.worker")

BASELINE = "eager_fp32"  # channels_last on CPU, inference_mode: the best plain PyTorch
NCHW = "eager_fp32_nchw"  # the same in the default NCHW layout, as its own row (CPU)
PROGRESS = "benchmark-progress"  # the stdout lines the parent's bar follows


def protocol_settings(cfg: DictConfig) -> dict:
    return cast(dict, OmegaConf.to_container(cfg.benchmark.presets[cfg.benchmark.protocol]))


def request_count(cfg: DictConfig) -> int:
    """Requests in flight in throughput mode: benchmark.throughput_mode.concurrency, 0: one per
    thread the one-call rows use (benchmark.threads, or torch's default: the cores)."""
    return cfg.benchmark.throughput_mode.concurrency or torch.get_num_threads()


def _load_only(cfg: DictConfig, variant: str) -> Runtime:
    return load_runtime(cfg, variant)[0]


def load_runtime(cfg: DictConfig, variant: str) -> tuple[Runtime, dict]:
    """The baselines from the train stage's checkpoint (channels_last or NCHW), a variant from
    its folder: both through `runtime.load_artifact`, as the stream client loads them."""
    if variant in (BASELINE, NCHW):
        return load_artifact(
            path(cfg, "checkpoint"),
            baseline_device(cfg),
            channels_last=None if variant == BASELINE else False,
        )
    return load_artifact(path(cfg, "optimized") / variant)


def baselines(cfg: DictConfig) -> list[str]:
    """The eager rows: on CPU the channels_last baseline and its NCHW twin; on CUDA one."""
    return [BASELINE, NCHW] if baseline_device(cfg) == "cpu" else [BASELINE]


def baseline_device(cfg: DictConfig) -> str:
    if cfg.benchmark.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.benchmark.device


def measure_variant(cfg: DictConfig, variant: str, rows_file: Path) -> None:
    """The worker: every batch size of the protocol for one variant, a JSON line per row."""
    if cfg.benchmark.threads:
        torch.set_num_threads(cfg.benchmark.threads)
    protocol = protocol_settings(cfg)
    runtime, meta = load_runtime(cfg, variant)
    power, power_note = None, None
    if runtime.device == "cuda":  # average power and energy per image, through NVML
        power, power_note = nvml_sampler(
            cuda_pci_bus_id(torch.cuda.get_device_properties(torch.cuda.current_device()))
        )
    reference_model, _ = models.load_trained(path(cfg, "checkpoint"))
    images, _ = evaluation.images(path(cfg, "prepared"), cfg.optimize.eval_splits, meta)
    for batch in protocol["batch_sizes"]:
        print(PROGRESS, "start", batch, flush=True)  # for the parent's bar (see _follow)
        row: dict[str, Any] = {
            "variant": variant,
            "batch": batch,
            "device": runtime.device,
            "threads": torch.get_num_threads(),
        }
        try:
            batches = rotated_batches(images, batch, cfg.benchmark.input_batches)
            check_inputs(batches)
            reference = evaluation.logits(reference_model, batches)
            row["check_agreement_pct"] = check_outputs(
                runtime, batches, reference, cfg.benchmark.min_agreement_pct
            )
            if runtime.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                row.update(time_runtime(runtime, batches, protocol, power))
            except PowerReadError as e:  # the power figures would be wrong: time without them
                row["power_error"] = error_text(str(e))
                row.update(time_runtime(runtime, batches, protocol))
            if power_note:
                row["power_error"] = power_note
            row["status"] = "ok"
            if batch in cfg.benchmark.throughput_mode.batch_sizes and runtime.device == "cpu":
                row.update(_throughput_mode(cfg, variant, batches, protocol))
            if runtime.device == "cuda":
                row["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        except Exception as e:  # noqa: BLE001 - the row records it; the other sizes still run
            log.exception("%s at batch %d failed", variant, batch)
            row.update(status="failed", error=error_text(e))
        # ru_maxrss is KiB on Linux: the process's peak so far (load + every size up to here)
        row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        with open(rows_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(PROGRESS, "done", batch, flush=True)
        log.info("%s b%d: %s", variant, batch, row_summary(row))
    if power is not None:
        power.close()


def _throughput_mode(
    cfg: DictConfig, variant: str, batches: list[torch.Tensor], protocol: dict
) -> dict[str, Any]:
    """The row's throughput-mode columns; a failure there is recorded, not the row's failure."""
    concurrency, threads = request_count(cfg), torch.get_num_threads()
    folder = path(cfg, "optimized") / variant
    try:
        record = (
            json.loads((folder / RECORD).read_text())
            if variant not in (BASELINE, NCHW)
            else {"backend": "torch_eager"}
        )
        if record["backend"] == "openvino":
            return time_openvino_async(
                folder,
                record,
                batches,
                protocol,
                threads,
                cfg.benchmark.throughput_mode.concurrency,
            )
        return time_processes(
            functools.partial(_load_only, cfg, variant),
            batches,
            protocol,
            concurrency,
            threads,
            cfg.benchmark.worker_timeout,
        )
    except Exception as e:  # noqa: BLE001 - recorded beside the one-call figures
        log.exception("%s throughput mode failed", variant)
        return {"concurrency": concurrency, "concurrency_method": "failed: " + error_text(e)}


def row_summary(row: dict) -> str:
    if row.get("status") != "ok":
        return f"{row.get('status')}: {row.get('error')}"
    method = row.get("concurrency_method")
    concurrent = (
        f"; throughput mode {row['throughput_concurrent']:.1f} img/s ({method})"
        if row.get("throughput_concurrent")
        else f"; throughput mode {method}"
        if method
        else ""
    )
    return (
        f"{row['throughput']:.1f} img/s (trials {row['throughput_min']:.1f}-"
        f"{row['throughput_max']:.1f}), p50 {row['latency_p50_ms']:.2f} ms, "
        f"p99 {row['latency_p99_ms']:.2f} ms{concurrent}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m oipipe.measure.worker",
        description="One variant of the benchmark, every batch size "
        "(started by the benchmark stage; internal).",
    )
    parser.add_argument("--variant", required=True)
    parser.add_argument("--rows", type=Path, required=True)
    parser.add_argument("--params", type=Path, required=True)
    args = parser.parse_args(argv)
    cli.setup_logging()
    measure_variant(load_params(args.params), args.variant, args.rows)


if __name__ == "__main__":
    main()
