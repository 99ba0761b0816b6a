"""Stage `benchmark`: throughput, latency and accuracy of every variant, measured to be trusted.

Each variant is timed in its own fresh process (`run_worker` starts `oipipe.measure.worker`:
one crash loses nothing else, no warm caches or threads are inherited); a row that fails, here or
in `optimize`, stays in the table with its reason. The timing itself is `oipipe.measure.timing`;
the winner and the Pareto front `oipipe.measure.pareto`. The protocol, outputs, settings and exit
codes: docs/stages/benchmark.md.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from oipipe.core import cli, progress
from oipipe.core.config import path
from oipipe.core.errors import InputError, error_text
from oipipe.core.files import write_csv, write_json
from oipipe.core.tracking import DVC_EXP_TAG, KEY_TAG, stage_run, verdict_code
from oipipe.deploy.runtime import RECORD
from oipipe.measure import evaluation, machine
from oipipe.measure.pareto import PARETO_COLUMNS, fastest_shippable, pareto_chart, pareto_points
from oipipe.measure.worker import (
    BASELINE,
    NCHW,
    PROGRESS,
    baseline_device,
    baselines,
    protocol_settings,
    row_summary,
)
from oipipe.reporting.plots import benchmark_charts
from oipipe.training import models

log = logging.getLogger("stages.benchmark")

# Each variant is timed by this module in a fresh process of its own (`run_worker`).
WORKER = "oipipe.measure.worker"

COLUMNS = [
    "variant",
    "backend",
    "precision",
    "batch",
    "status",
    "error",
    "throughput",
    "throughput_min",
    "throughput_max",
    "throughput_std",
    "latency_p50_ms",
    "latency_mean_ms",
    "latency_p90_ms",
    "latency_p99_ms",
    "speedup",
    "top1_pct",
    "top1_ci_low_pct",
    "top1_ci_high_pct",
    "eval_images",
    "agreement_pct",
    "verdict",
    "size_mb",
    "build_seconds",
    "peak_rss_mb",
    "cuda_max_allocated_mb",
    "gflops_per_s",
    "iterations",
    "trials",
    "threads",
    "device",
    "check_agreement_pct",
    "concurrency",
    "throughput_concurrent",
    "throughput_concurrent_min",
    "throughput_concurrent_max",
    "concurrency_method",
    "speedup_concurrent",
    "power_avg_w",
    "energy_per_image_j",
    "power_source",
    "power_error",
]


# --- the stage -------------------------------------------------------------------------------


def flops_per_image(model: torch.nn.Module, input_size: int) -> float:
    """Forward FLOPs of one image (a multiply-add counts 2), counted by PyTorch's FlopCounter."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(1, 3, input_size, input_size))
    return float(counter.get_total_flops())


def variants_to_measure(cfg: DictConfig) -> tuple[list[str], dict[str, dict]]:
    """(variants to time, records of every listed variant) in the configured order."""
    wanted = protocol_settings(cfg)["variants"] or list(cfg.optimize.variants)
    records = {}
    for name in wanted:
        f = path(cfg, "optimized") / name / RECORD
        if not f.is_file():
            raise InputError(
                f"{f} not found: run `dvc repro optimize@{name}` first (or drop "
                f"{name!r} from the benchmark's variants)"
            )
        records[name] = json.loads(f.read_text())
    return [n for n in wanted if records[n]["status"] == "ok"], records


def run_worker(cfg: DictConfig, variant: str, work: Path, bar: tqdm | None = None) -> list[dict]:
    """One variant in a fresh process; rows it did not write (a crash) become failed rows.
    `bar` follows the worker's progress lines: the batch it is on, a step per finished row."""
    params = work / "params.yaml"
    if not params.is_file():  # one config for every worker of this benchmark
        params.write_text(OmegaConf.to_yaml(cfg))
    rows_file = work / f"{variant}.jsonl"
    rows_file.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        WORKER,
        "--variant",
        variant,
        "--rows",
        str(rows_file),
        "--params",
        str(params),
    ]
    with open(work / f"{variant}.stderr", "w+", encoding="utf-8") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        follower = threading.Thread(target=_follow, args=(proc.stdout, variant, bar), daemon=True)
        follower.start()
        try:
            proc.wait(timeout=cfg.benchmark.worker_timeout)
            err.seek(0)
            why = f"worker exited with code {proc.returncode}: {_tail(err.read())}"
        except subprocess.TimeoutExpired:
            why = f"worker timed out after {cfg.benchmark.worker_timeout:.0f} s"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            # not waited for beyond this: a process the worker spawned may hold the pipe open
            follower.join(timeout=5)
    rows = []
    if rows_file.is_file():
        rows = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()]
    done = {r["batch"] for r in rows}
    for batch in protocol_settings(cfg)["batch_sizes"]:
        if batch not in done:
            rows.append({"variant": variant, "batch": batch, "status": "failed", "error": why})
    return rows


def _follow(stdout: IO[str], variant: str, bar: tqdm | None) -> None:
    # Reads every line (an unread pipe would stall the worker once full); only ours count. The
    # worker writes them before a row's checks and after its timing, so a redraw here never
    # falls inside a timed call.
    for line in stdout:
        word = line.split()
        if bar is None or len(word) != 3 or word[0] != PROGRESS:
            continue
        if word[1] == "start":
            bar.set_description(f"{variant} b{word[2]}")
        else:
            bar.update(1)


def _tail(text: str, lines: int = 3) -> str:
    return error_text(" | ".join(text.strip().splitlines()[-lines:]))


def run(cfg: DictConfig) -> dict:
    """Time every ok variant and the eager baselines; write the table, plots and MLflow runs."""
    protocol = protocol_settings(cfg)
    to_time, records = variants_to_measure(cfg)
    model, meta = models.load_trained(path(cfg, "checkpoint"))
    images, labels = evaluation.images(path(cfg, "prepared"), cfg.optimize.eval_splits, meta)
    fp32 = np.concatenate(
        evaluation.logits(model, evaluation.batches(images, cfg.optimize.eval_batch))
    )
    baseline_acc = evaluation.top1_with_interval(fp32, labels)
    flops = flops_per_image(model, meta["input_size"])
    baseline_size = (
        sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**20
    )
    rows: list[dict] = []
    variants, sizes = [*baselines(cfg), *to_time], len(protocol["batch_sizes"])
    # No clock (tick=None) and a redraw per update only (miniters=1: tqdm's monitor thread then
    # never redraws): the bar moves between measurements, never while a worker times a call.
    with (
        tempfile.TemporaryDirectory(prefix="benchmark-") as tmp,
        progress.steps(
            len(variants) * sizes, "benchmark", "row", tick=None, miniters=1, mininterval=0
        ) as bar,
    ):
        for k, variant in enumerate(variants, start=1):
            log.info(
                "timing %s at batch sizes %s in a fresh process", variant, protocol["batch_sizes"]
            )
            bar.set_description(variant)
            done = run_worker(cfg, variant, Path(tmp), bar)
            bar.update(k * sizes - bar.n)  # the rows a crashed worker did not report
            for r in done:
                log.info("  %s b%d: %s", variant, r["batch"], row_summary(r))
            rows += done
    for name, rec in records.items():
        if rec["status"] != "ok":
            rows += [
                {
                    "variant": name,
                    "batch": b,
                    "status": rec["status"],
                    "error": rec.get("reason") or rec.get("error"),
                }
                for b in protocol["batch_sizes"]
            ]
    rows = [_complete(r, records, baseline_acc, baseline_size, flops) for r in rows]
    base = {
        r["batch"]: r["throughput"]
        for r in rows
        if r["variant"] == BASELINE and r["status"] == "ok"
    }
    for r in rows:
        if r["status"] == "ok" and r["batch"] in base:
            r["speedup"] = round(r["throughput"] / base[r["batch"]], 3)
    base_concurrent = {
        r["batch"]: r["throughput_concurrent"]
        for r in rows
        if r["variant"] == BASELINE and r.get("throughput_concurrent")
    }
    for r in rows:
        if r.get("throughput_concurrent") and r["batch"] in base_concurrent:
            r["speedup_concurrent"] = round(
                r["throughput_concurrent"] / base_concurrent[r["batch"]], 3
            )
    winners = {str(b): winner(rows, b) for b in protocol["batch_sizes"]}
    # the same verdict with several requests in flight (benchmark.throughput_mode)
    winners_concurrent = {
        str(b): winner(rows, b, "throughput_concurrent")
        for b in protocol["batch_sizes"]
        if b in cfg.benchmark.throughput_mode.batch_sizes
    }
    ref = cfg.benchmark.reference_batch
    ref = ref if ref in protocol["batch_sizes"] else max(protocol["batch_sizes"])
    best = winners[str(ref)]
    facts = machine.machine_info()
    table = {
        "protocol": cfg.benchmark.protocol,
        "device": baseline_device(cfg),
        "threads": next((r["threads"] for r in rows if r.get("threads")), None),
        "baseline": BASELINE,
        "baseline_note": (
            "eager fp32, channels_last, inference_mode"
            if baseline_device(cfg) == "cpu"
            else "eager fp32, inference_mode"
        ),
        "eval_splits": list(cfg.optimize.eval_splits),
        "eval_images": int(len(labels)),
        "reference_batch": ref,
        "best_variant": best["variant"],
        "best_speedup": best.get("speedup"),
        "best_verdict": best.get("verdict"),
        "winners": winners,
        "winners_throughput_mode": winners_concurrent,
        "gflops_per_image": round(flops / 1e9, 4),
        "machine": facts,
        "rows": {f"{r['variant']}.b{r['batch']}": r for r in rows},
    }
    plots = path(cfg, "plots")
    write_json(path(cfg, "metrics") / "benchmark.json", table)
    write_csv(
        plots / "benchmark.csv",
        [*COLUMNS, "label"],
        [[_csv(r.get(c)) for c in COLUMNS] + [f"{r['variant']}@b{r['batch']}"] for r in rows],
    )
    benchmark_charts(rows, plots)
    front = pareto_points(rows, ref)
    write_csv(
        plots / "pareto.csv",
        PARETO_COLUMNS,
        [[_csv(p.get(c)) for c in PARETO_COLUMNS] for p in front],
    )
    pareto_chart(front, ref, BASELINE, plots / "pareto.png")
    with stage_run(cfg, "benchmark") as tracker:
        tracker.set_tags({f"machine.{k}": str(v) for k, v in facts.items()})
        tracker.log_params(
            {
                "benchmark.protocol": cfg.benchmark.protocol,
                "benchmark.threads": table["threads"],
                **{f"benchmark.{k}": v for k, v in protocol.items()},
            }
        )
        # best_* are the winner's at the reference batch: the tags name it and its verdict
        tracker.log_metrics(
            {
                "best_speedup": best.get("speedup") or 0.0,
                "best_throughput": best.get("throughput") or 0.0,
                "best_verdict_code": verdict_code(best.get("verdict")),
                "reference_batch": ref,
            }
        )
        tracker.set_tags(
            {
                "benchmark.best_variant": str(best["variant"]),
                "benchmark.best_verdict": str(best.get("verdict")),
                **{f"benchmark.winner.b{b}": str(w["variant"]) for b, w in winners.items()},
            }
        )
        log_child_runs(tracker, rows, cfg)
        for f in (
            path(cfg, "metrics") / "benchmark.json",
            plots / "pareto.png",
            plots / "pareto.csv",
        ):
            tracker.log_artifact(f)
    for b, w in winners.items():
        log.info("winner at batch %s: %s", b, _winner_line(w))
    for b, w in winners_concurrent.items():
        log.info(
            "winner at batch %s in throughput mode: %s",
            b,
            (
                f"{w['variant']} ({w['verdict']}), {w['throughput_concurrent']:.1f} img/s with "
                f"{w['concurrency_method']}"
                if w.get("variant")
                else "none"
            ),
        )
    return table


def _winner_line(w: dict) -> str:
    if not w.get("variant"):
        return "none (no variant finished with a verdict other than fail)"
    return (
        f"{w['variant']} ({w['verdict']}), {w['throughput']:.1f} img/s, p99 "
        f"{w['latency_p99_ms']:.1f} ms, {w['speedup']:.2f}x {BASELINE}, "
        f"top-1 {w['top1_pct']:.1f}% [{w['top1_ci_low_pct']:.1f}, "
        f"{w['top1_ci_high_pct']:.1f}] on {w['eval_images']} images"
    )


def _complete(
    row: dict, records: dict, baseline_acc: dict, baseline_size: float, flops: float
) -> dict:
    out = {c: row.get(c) for c in COLUMNS}
    if row["variant"] in (BASELINE, NCHW):
        out.update(
            backend="torch_eager",
            precision="fp32",
            agreement_pct=100.0,
            verdict="pass",
            size_mb=round(baseline_size, 3),
            build_seconds=0.0,
            **{
                k: baseline_acc[k]
                for k in ("top1_pct", "top1_ci_low_pct", "top1_ci_high_pct", "eval_images")
            },
        )
    else:
        rec = records[row["variant"]]
        out.update(
            {
                k: rec.get(k)
                for k in (
                    "backend",
                    "precision",
                    "top1_pct",
                    "top1_ci_low_pct",
                    "top1_ci_high_pct",
                    "eval_images",
                    "agreement_pct",
                    "verdict",
                    "size_mb",
                    "build_seconds",
                )
            }
        )
    if out["status"] == "ok" and out["throughput"] is not None:  # an ok row has its throughput
        out["gflops_per_s"] = round(flops * out["throughput"] / 1e9, 3)
    return out


WINNER_KEYS = (
    "variant",
    "verdict",
    "batch",
    "throughput",
    "latency_p99_ms",
    "speedup",
    "top1_pct",
    "top1_ci_low_pct",
    "top1_ci_high_pct",
    "eval_images",
)
CONCURRENT_KEYS = (
    "throughput_concurrent",
    "speedup_concurrent",
    "concurrency",
    "concurrency_method",
)


def winner(rows: list[dict], batch: int, key: str = "throughput") -> dict:
    """The fastest row at `batch` whose accuracy verdict is not `fail` (an `undecided` one is
    kept and labelled by its verdict); {"variant": None, "batch": batch} when there is none.
    `key` throughput_concurrent: fastest in throughput mode, with how that mode ran."""
    best = fastest_shippable([r for r in rows if r["batch"] == batch], key)
    if best is None:
        return {"variant": None, "batch": batch}
    keys = WINNER_KEYS + (CONCURRENT_KEYS if key == "throughput_concurrent" else ())
    return {k: best.get(k) for k in keys}


def _csv(v: Any) -> Any:
    if v is None:
        return ""
    return round(v, 4) if isinstance(v, float) else v


def log_child_runs(tracker, rows: list[dict], cfg: DictConfig) -> None:
    """A nested MLflow run per (variant, batch size) under the pipeline run; reruns reuse them.

    Each carries `model.name`, the pipeline key and `DVC_EXP_NAME` as tags; a failed row ends
    FAILED and a skipped one KILLED, so the runs table's status column shows what did not run."""
    if not tracker.enabled:
        return
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    parent = tracker.run_id
    run = client.get_run(parent)
    exp = run.info.experiment_id
    common = {
        "model.name": str(cfg.model.name),
        KEY_TAG: run.data.tags.get(KEY_TAG, ""),
        **({DVC_EXP_TAG: os.environ["DVC_EXP_NAME"]} if os.environ.get("DVC_EXP_NAME") else {}),
    }
    existing = {
        r.data.tags.get("benchmark.row"): r.info.run_id
        for r in client.search_runs(
            [exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=1000
        )
    }
    for r in rows:
        key = f"{r['variant']}@b{r['batch']}"
        # not a `with` block: its exit would end the run FINISHED whatever the row's status
        mlflow.start_run(
            run_id=existing.get(key),
            experiment_id=exp,
            nested=True,
            run_name=None if key in existing else key,
            tags={**common, "benchmark.row": key, "status": r["status"]},
        )
        status = {"ok": "FINISHED", "skipped": "KILLED"}.get(r["status"], "FAILED")
        try:
            mlflow.log_params(
                {
                    "variant": r["variant"],
                    "backend": r["backend"],
                    "precision": r["precision"],
                    "batch_size": r["batch"],
                }
            )
            mlflow.log_metrics(
                {
                    k: float(r[k])
                    for k in (
                        "throughput",
                        "latency_p50_ms",
                        "latency_p90_ms",
                        "latency_p99_ms",
                        "speedup",
                        "top1_pct",
                        "top1_ci_low_pct",
                        "top1_ci_high_pct",
                        "eval_images",
                        "agreement_pct",
                        "size_mb",
                        "build_seconds",
                        "peak_rss_mb",
                        "gflops_per_s",
                        "throughput_concurrent",
                        "speedup_concurrent",
                        "concurrency",
                        "power_avg_w",
                        "energy_per_image_j",
                    )
                    if isinstance(r.get(k), int | float)
                    and not isinstance(r.get(k), bool)
                    and math.isfinite(r[k])
                }
            )
            if r.get("error"):
                mlflow.set_tag("error", str(r["error"])[:5000])
            if r.get("concurrency_method"):
                mlflow.set_tag("concurrency_method", str(r["concurrency_method"])[:5000])
            if r.get("verdict"):
                mlflow.set_tag("verdict", r["verdict"])
                code = verdict_code(r["verdict"])
                if code is not None:  # a verdict without a code is kept as the tag alone
                    mlflow.log_metric("verdict_code", code)
        except BaseException:
            mlflow.end_run("FAILED")
            raise
        mlflow.end_run(status)


def main() -> None:
    cli.main("benchmark", run)


if __name__ == "__main__":
    main()
