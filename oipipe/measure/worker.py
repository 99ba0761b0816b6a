"""The benchmark's worker: one variant, loaded once, timed on the parent's command.

    python -m oipipe.measure.worker --variant NAME --params PARAMS

The benchmark stage starts one per variant (`stages.benchmark.WorkerProcess`), all of them
alive together, and times them in turn, round after round (`oipipe.measure.rounds`): a fresh
process per variant (one crash loses nothing else; no variant inherits another's caches or
threads), timed interleaved with the others (a noisy minute hurts every row alike). It speaks
JSON lines: commands on stdin (`{"cmd": "trial", "batch": B}`, `{"cmd": "finish"}`), answers on
stdout after the `MESSAGE` word (other stdout lines, a library's chatter, are ignored). It is
internal: nothing else needs to run it.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import resource
import sys
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import DictConfig, OmegaConf

from oipipe.core import cli
from oipipe.core.config import load_params, path
from oipipe.core.errors import error_text
from oipipe.deploy.runtime import RECORD, Runtime, load_artifact
from oipipe.measure import evaluation
from oipipe.measure.power import cuda_pci_bus_id, nvml_sampler
from oipipe.measure.rounds import LocalContender
from oipipe.measure.timing import (
    check_inputs,
    check_outputs,
    rotated_batches,
    time_openvino_async,
    time_processes,
)
from oipipe.training import models

log = logging.getLogger("oipipe.measure.worker")

BASELINE = "eager_fp32"  # channels_last on CPU, inference_mode: the best plain PyTorch
NCHW = "eager_fp32_nchw"  # the same in the default NCHW layout, as its own row (CPU)
MESSAGE = "benchmark-msg"  # the first word of the stdout lines the parent reads


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


def say(message: dict[str, Any]) -> None:
    print(MESSAGE, json.dumps(message), flush=True)


def load(cfg: DictConfig, variant: str) -> tuple[LocalContender, dict[str, Any]]:
    """The variant loaded, checked against fp32 and warmed up at every batch size of the
    protocol: (its contender, the `loaded` message: device, threads, each batch's agreement
    with fp32 or why it is not timed there)."""
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
    ok: dict[int, list[torch.Tensor]] = {}
    checks: dict[str, float] = {}
    errors: dict[str, str] = {}
    for batch in protocol["batch_sizes"]:
        try:
            batches = rotated_batches(images, batch, cfg.benchmark.input_batches)
            check_inputs(batches)
            reference = evaluation.logits(reference_model, batches)
            checks[str(batch)] = check_outputs(
                runtime, batches, reference, cfg.benchmark.min_agreement_pct
            )
            ok[batch] = batches
        except Exception as e:  # noqa: BLE001 - the row records it; the other sizes still run
            log.exception("%s at batch %d failed its checks", variant, batch)
            errors[str(batch)] = error_text(e)
    contender = LocalContender(variant, runtime, ok, protocol, power)
    contender.power_note = power_note
    return contender, {
        "type": "loaded",
        "device": runtime.device,
        "threads": torch.get_num_threads(),
        "checks": checks,
        "errors": errors,
    }


def finish(cfg: DictConfig, variant: str, contender: LocalContender) -> dict[str, Any]:
    """The `finished` message: the throughput-mode columns of each timed batch size, the peak
    memory, and the power note or error."""
    protocol = protocol_settings(cfg)
    extras: dict[str, dict] = {}
    for batch in contender.inputs:
        extra: dict[str, Any] = {}
        if batch in cfg.benchmark.throughput_mode.batch_sizes and contender.runtime.device == "cpu":
            extra.update(_throughput_mode(cfg, variant, contender.raw[batch], protocol))
        extras[str(batch)] = extra
    out: dict[str, Any] = {"type": "finished", "batches": extras}
    if contender.runtime.device == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    # ru_maxrss is KiB on Linux: the process's peak (load, checks, every trial)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    note = contender.power_error or contender.power_note
    if note:
        out["power_error"] = error_text(note)
    return out


def serve(cfg: DictConfig, variant: str) -> None:
    """The worker's life: load and say so, then one answer per command until `finish`."""
    contender, loaded = load(cfg, variant)
    say(loaded)
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "trial":
            try:
                say({"type": "trial", **contender.trial(int(command["batch"]))})
            except Exception as e:  # noqa: BLE001 - this row fails; the others still run
                log.exception("%s at batch %s failed", variant, command["batch"])
                say({"type": "error", "error": error_text(e)})
        elif command["cmd"] == "finish":
            say(finish(cfg, variant, contender))
            break
        else:
            raise ValueError(f"unknown worker command {command!r}")
    if contender.power is not None:
        contender.power.close()


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
        description="One variant of the benchmark, timed on the parent's commands "
        "(started by the benchmark stage; internal).",
    )
    parser.add_argument("--variant", required=True)
    parser.add_argument("--params", type=Path, required=True)
    args = parser.parse_args(argv)
    cli.setup_logging()
    serve(load_params(args.params), args.variant)


if __name__ == "__main__":
    main()
