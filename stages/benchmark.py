"""Stage `benchmark`: throughput, latency and accuracy of every variant, measured to be trusted.

Each variant runs in its own fresh process (`WorkerProcess` starts `oipipe.measure.worker`:
one crash loses nothing else, no warm caches or threads are inherited), all of them loaded
together and timed in turn, round after round (`oipipe.measure.rounds`), so speed-ups are
per-round ratios; a row that fails, here or in `optimize`, stays in the table with its reason.
The timing loop is `oipipe.measure.timing`; the winner and the Pareto front
`oipipe.measure.pareto`. The protocol, outputs, settings and exit
codes: docs/stages/benchmark.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import queue
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

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
from oipipe.measure import evaluation, machine, roofline, rounds
from oipipe.measure.pareto import (
    PARETO_COLUMNS,
    TIE_MARGIN_PCT,
    fastest_shippable,
    pareto_chart,
    pareto_points,
)
from oipipe.measure.rounds import ContenderFailed
from oipipe.measure.timing import summarise
from oipipe.measure.worker import (
    BASELINE,
    MESSAGE,
    NCHW,
    baseline_device,
    baselines,
    protocol_settings,
    row_summary,
)
from oipipe.reporting.plots import benchmark_charts, roofline_chart
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
    "speedup_min",
    "speedup_max",
    "baseline",
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
    "intensity_flop_per_byte",
    "peak_gflops",
    "peak_pct",
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


class WorkerProcess:
    """One variant's worker process (`oipipe.measure.worker`), loaded and checked on start, then
    timed on command: a `rounds.Contender`. A worker that dies or takes longer than
    `benchmark.worker_timeout` for one step fails with its stderr's last lines (fatal: its
    rows not timed yet fail, the other variants go on)."""

    def __init__(self, cfg: DictConfig, variant: str, work: Path) -> None:
        self.name, self.timeout = variant, cfg.benchmark.worker_timeout
        params = work / "params.yaml"
        if not params.is_file():  # one config for every worker of this benchmark
            params.write_text(OmegaConf.to_yaml(cfg))
        cmd = [sys.executable, "-m", WORKER, "--variant", variant, "--params", str(params)]
        self.err = open(work / f"{variant}.stderr", "w+", encoding="utf-8")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True
        )
        self.messages: queue.Queue[dict | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.loaded = self._receive("loaded")
        self.checks = {int(b): v for b, v in self.loaded["checks"].items()}
        self.errors = {int(b): e for b, e in self.loaded["errors"].items()}

    def _read(self) -> None:
        # Reads every line (an unread pipe would stall the worker once full); only ours count.
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            word, _, rest = line.partition(" ")
            if word == MESSAGE:
                self.messages.put(json.loads(rest))
        self.messages.put(None)  # end of output: the worker has exited (or closed stdout)

    def _receive(self, kind: str) -> dict:
        try:
            msg = self.messages.get(timeout=self.timeout)
        except queue.Empty:
            self.close()
            raise ContenderFailed(
                f"worker timed out after {self.timeout:.0f} s", fatal=True
            ) from None
        if msg is None:
            code = self.proc.wait()
            self.err.seek(0)
            raise ContenderFailed(
                f"worker exited with code {code}: {_tail(self.err.read())}", fatal=True
            )
        if msg["type"] == "error":
            raise ContenderFailed(msg["error"])
        if msg["type"] != kind:
            raise ContenderFailed(f"worker answered {msg['type']!r}, expected {kind!r}", True)
        return msg

    def _send(self, command: dict) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(command) + "\n")
            self.proc.stdin.flush()
        except OSError as e:  # it died: _receive says how
            log.debug("%s: %s", self.name, e)

    def takes(self, batch: int) -> bool:
        return batch in self.checks

    def trial(self, batch: int) -> dict:
        self._send({"cmd": "trial", "batch": batch})
        return self._receive("trial")

    def finish(self) -> dict:
        self._send({"cmd": "finish"})
        return self._receive("finished")

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.err.close()


def _tail(text: str, lines: int = 3) -> str:
    return error_text(" | ".join(text.strip().splitlines()[-lines:]))


def measure(
    cfg: DictConfig, variants: list[str], work: Path, bar: tqdm | None = None
) -> tuple[list[dict], dict]:
    """Every variant's worker started (one at a time: loading is not timed, and no two load
    at once), all timed interleaved (`rounds.interleave`), then finished one at a time (their
    throughput mode). (rows, facts): a row per variant and batch size, failed ones with their
    reason; the rounds and the machine's load before and after."""
    protocol = protocol_settings(cfg)
    sizes = list(protocol["batch_sizes"])
    workers: dict[str, WorkerProcess] = {}
    failed: dict[str, str] = {}

    def step(what: str) -> None:
        if bar is not None:
            bar.set_description(what)
            bar.update(1)

    load_before = os.getloadavg()
    try:
        for v in variants:
            log.info("loading %s in a fresh process (checks and warm-up at %s)", v, sizes)
            try:
                workers[v] = WorkerProcess(cfg, v, work)
            except ContenderFailed as e:
                failed[v] = str(e)
            step(f"{v} loaded")
        outcome = rounds.interleave(
            list(workers.values()),
            sizes,
            protocol["trials"],
            on_trial=lambda name, batch, r: step(
                f"round {r + 1}/{protocol['trials']} {name} b{batch}"
            ),
        )
        finished: dict[str, dict] = {}
        for v, w in workers.items():
            try:
                finished[v] = w.finish()
            except ContenderFailed as e:
                failed[v] = f"after its trials: {e}"
            step(f"{v} finished")
    finally:
        for w in workers.values():
            w.close()
    load_after = os.getloadavg()
    rows = []
    for v in variants:
        for b in sizes:
            row: dict[str, Any] = {"variant": v, "batch": b}
            w_or_none = workers.get(v)
            if w_or_none is None:
                rows.append({**row, "status": "failed", "error": failed[v]})
                continue
            w = w_or_none
            row.update(device=w.loaded["device"], threads=w.loaded["threads"])
            error = w.errors.get(b) or outcome.errors.get((v, b))
            if error is None and v in failed:
                error = failed[v]
            if error is not None:
                rows.append({**row, "status": "failed", "error": error})
                continue
            trials = outcome.trials[v, b]
            done = finished[v]
            windows = [t["power"] for t in trials if "power" in t]
            row.update(
                summarise(
                    [t["times"] for t in trials],
                    b,
                    windows if len(windows) == len(trials) else None,
                ),
                status="ok",
                check_agreement_pct=w.checks[b],
                peak_rss_mb=done.get("peak_rss_mb"),
                **done["batches"].get(str(b), {}),
            )
            for k in ("cuda_max_allocated_mb", "power_error"):
                if done.get(k) is not None:
                    row[k] = done[k]
            rows.append(row)
    facts = {
        "timing": "interleaved: every variant loaded in its own process, one trial of each in "
        "turn per round, the order rotated each round",
        "rounds": outcome.rounds,
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in load_after],
    }
    return rows, facts


def own_counts(records: dict[str, dict], variant: str) -> dict | None:
    """A variant's own network's FLOPs and bytes (a pruned one's record has them), or None: it
    runs the trained model's network."""
    return (records.get(variant) or {}).get("model_counts")


def add_roofline(
    cfg: DictConfig,
    rows: list[dict],
    model: torch.nn.Module,
    input_size: int,
    flops: float,
    records: dict[str, dict] | None = None,
) -> tuple[dict, dict]:
    """Each ok row's roofline columns (`oipipe.measure.roofline.point`), from this machine's
    peaks measured now (every worker has exited: the machine is as quiet as the rows had it),
    with the rows' thread count; (peaks, traffic). A row whose record has `model_counts` (a
    pruned network) is placed by its own FLOPs and bytes. benchmark.roofline=false: none."""
    records = records or {}
    if not cfg.benchmark.roofline:
        return {}, {}
    ok = [r for r in rows if r["status"] == "ok"]
    wanted: dict[str, set[str]] = {}
    for r in ok:
        wanted.setdefault(r.get("device") or "cpu", set()).add(str(r.get("precision")))
    threads = torch.get_num_threads()
    if cfg.benchmark.threads:
        torch.set_num_threads(cfg.benchmark.threads)
    try:
        log.info("measuring this machine's matmul peaks and copy bandwidth (%s)", sorted(wanted))
        peaks = roofline.measure_peaks(wanted)
    finally:
        torch.set_num_threads(threads)
    fixed, per_image = roofline.traffic(model, input_size)
    for r in ok:
        own = own_counts(records, r["variant"])
        if own:
            r.update(
                roofline.point(
                    r, own["flops_per_image"], own["fixed_bytes"], own["bytes_per_image"], peaks
                )
            )
        else:
            r.update(roofline.point(r, flops, fixed, per_image, peaks))
    return peaks, {"fixed_bytes": fixed, "bytes_per_image": per_image, "precision": "fp32"}


def choose_baselines(rows: list[dict], sizes: list[int]) -> dict[int, str]:
    """The baseline at each batch size: the faster of the channels_last and NCHW eager rows
    there, by the median of their per-round ratio (one of them when the other did not run)."""
    out = {}
    for b in sizes:
        got = {
            r["variant"]: r
            for r in rows
            if r["batch"] == b and r["variant"] in (BASELINE, NCHW) and r["status"] == "ok"
        }
        if len(got) == 2:
            ratio = rounds.ratio_summary(
                rounds.round_ratios(
                    got[NCHW]["throughput_rounds"], got[BASELINE]["throughput_rounds"]
                )
            )["median"]
            out[b] = NCHW if ratio > 1 else BASELINE
        elif got:
            out[b] = next(iter(got))
    return out


def add_speedups(rows: list[dict], base: dict[int, str]) -> None:
    """Each ok row's speed-up over its batch's baseline: the median of the per-round ratios
    (a trial over the baseline's trial of the same round), with their spread; in throughput
    mode (not interleaved) the ratio of the medians."""
    by = {(r["variant"], r["batch"]): r for r in rows if r["status"] == "ok"}
    for r in rows:
        b = r["batch"]
        ref = by.get((base.get(b), b))
        if r["status"] != "ok" or ref is None:
            continue
        ratio = rounds.ratio_summary(
            rounds.round_ratios(r["throughput_rounds"], ref["throughput_rounds"])
        )
        r["speedup"] = round(ratio["median"], 3)
        r["speedup_min"], r["speedup_max"] = round(ratio["min"], 3), round(ratio["max"], 3)
        r["baseline"] = ref["variant"]
        if r.get("throughput_concurrent") and ref.get("throughput_concurrent"):
            r["speedup_concurrent"] = round(
                r["throughput_concurrent"] / ref["throughput_concurrent"], 3
            )


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
    flops = roofline.flops_per_image(model, meta["input_size"])
    baseline_size = (
        sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**20
    )
    variants, sizes = [*baselines(cfg), *to_time], len(protocol["batch_sizes"])
    # No clock (tick=None) and a redraw per update only (miniters=1: tqdm's monitor thread then
    # never redraws): the bar moves between trials, never while a worker times a call.
    with (
        tempfile.TemporaryDirectory(prefix="benchmark-") as tmp,
        progress.steps(
            len(variants) * (2 + sizes * protocol["trials"]),
            "benchmark",
            "step",
            tick=None,
            miniters=1,
            mininterval=0,
        ) as bar,
    ):
        rows, timing_facts = measure(cfg, variants, Path(tmp), bar)
        bar.update(bar.total - bar.n)  # the trials of rows that failed before them
    for r in rows:
        log.info("  %s b%d: %s", r["variant"], r["batch"], row_summary(r))
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
    ref = cfg.benchmark.reference_batch
    ref = ref if ref in protocol["batch_sizes"] else max(protocol["batch_sizes"])
    chosen = choose_baselines(rows, list(protocol["batch_sizes"]))
    add_speedups(rows, chosen)
    peaks, traffic = add_roofline(cfg, rows, model, meta["input_size"], flops, records)
    margin = cfg.benchmark.tie_margin_pct
    winners = {str(b): winner(rows, b, margin_pct=margin) for b in protocol["batch_sizes"]}
    # the same verdict with several requests in flight (benchmark.throughput_mode)
    winners_concurrent = {
        str(b): winner(rows, b, "throughput_concurrent", margin)
        for b in protocol["batch_sizes"]
        if b in cfg.benchmark.throughput_mode.batch_sizes
    }
    best = winners[str(ref)]
    facts = machine.machine_info()
    table = {
        "protocol": cfg.benchmark.protocol,
        "device": baseline_device(cfg),
        "threads": next((r["threads"] for r in rows if r.get("threads")), None),
        "threads_reason": threads_reason(cfg, rows),
        # the baseline at the reference batch, and at each batch size (the faster eager layout)
        "baseline": chosen.get(ref, BASELINE),
        "baselines": {str(b): v for b, v in chosen.items()},
        "baseline_note": (
            "eager fp32 under inference_mode, the faster of channels_last (eager_fp32) and "
            "NCHW (eager_fp32_nchw) at each batch size"
            if baseline_device(cfg) == "cpu"
            else "eager fp32, inference_mode"
        ),
        "tie_margin_pct": margin,
        **timing_facts,
        "eval_splits": list(cfg.optimize.eval_splits),
        "eval_images": int(len(labels)),
        "reference_batch": ref,
        "best_variant": best["variant"],
        "best_speedup": best.get("speedup"),
        "best_verdict": best.get("verdict"),
        "winners": winners,
        "winners_throughput_mode": winners_concurrent,
        "gflops_per_image": round(flops / 1e9, 4),
        "peaks": peaks,
        "traffic": traffic,
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
    pareto_chart(front, ref, table["baseline"], plots / "pareto.png")
    roofline_chart(
        rows,
        roofline.roofs(peaks),
        sorted({min(protocol["batch_sizes"]), ref}),
        plots / "roofline.png",
    )
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
                **{f"benchmark.baseline.b{b}": v for b, v in table["baselines"].items()},
            }
        )
        log_child_runs(tracker, rows, cfg)
        tracker.log_metrics(
            {
                f"peak.{device}.{k}": float(v)
                for device, got in peaks.items()
                for k, v in got.items()
                if isinstance(v, int | float) and k != "threads"
            }
        )
        for f in (
            path(cfg, "metrics") / "benchmark.json",
            plots / "pareto.png",
            plots / "roofline.png",
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
        f"{w['latency_p99_ms']:.1f} ms, {w['speedup']:.2f}x {w.get('baseline')}, "
        f"top-1 {w['top1_pct']:.1f}% [{w['top1_ci_low_pct']:.1f}, "
        f"{w['top1_ci_high_pct']:.1f}] on {w['eval_images']} images"
        + (f"; its speed ties with {', '.join(w['tied_with'])}" if w.get("tied_with") else "")
    )


def _complete(
    row: dict, records: dict, baseline_acc: dict, baseline_size: float, flops: float
) -> dict:
    out = {c: row.get(c) for c in COLUMNS}
    out["throughput_rounds"] = row.get("throughput_rounds")  # benchmark.json only, not the CSV
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
        own = own_counts(records, row["variant"]) or {}
        out["gflops_per_s"] = round(own.get("flops_per_image", flops) * out["throughput"] / 1e9, 3)
    return out


WINNER_KEYS = (
    "variant",
    "baseline",
    "verdict",
    "batch",
    "throughput",
    "latency_p99_ms",
    "speedup",
    "speedup_min",
    "speedup_max",
    "top1_pct",
    "top1_ci_low_pct",
    "top1_ci_high_pct",
    "eval_images",
    "size_mb",
)
CONCURRENT_KEYS = (
    "throughput_concurrent",
    "speedup_concurrent",
    "concurrency",
    "concurrency_method",
)


def winner(
    rows: list[dict], batch: int, key: str = "throughput", margin_pct: float = TIE_MARGIN_PCT
) -> dict:
    """The row to ship at `batch` (`pareto.fastest_shippable`: the fastest whose accuracy verdict
    is not `fail`, unless rows whose speeds tie with it are better on verdict, accuracy, size);
    `tied_with` names the rows whose speed tied; {"variant": None, "batch": batch} when there is
    none. `key` throughput_concurrent: throughput mode, with how that mode ran."""
    best = fastest_shippable([r for r in rows if r["batch"] == batch], key, margin_pct)
    if best is None:
        return {"variant": None, "batch": batch}
    keys = WINNER_KEYS + (CONCURRENT_KEYS if key == "throughput_concurrent" else ())
    return {**{k: best.get(k) for k in keys}, "tied_with": [r["variant"] for r in best["tied"]]}


def threads_reason(cfg: DictConfig, rows: list[dict]) -> str:
    """The intra-op thread count the rows were timed with, and why that one."""
    threads = next((r["threads"] for r in rows if r.get("threads")), None)
    if cfg.benchmark.threads:
        return f"{threads}: benchmark.threads"
    return (
        f"{threads}: torch's default, one per core this process may use ("
        f"{len(os.sched_getaffinity(0))} CPUs in its affinity mask); benchmark.threads sets another"
    )


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
                        "throughput_min",
                        "throughput_max",
                        "latency_p50_ms",
                        "latency_p90_ms",
                        "latency_p99_ms",
                        "speedup",
                        "speedup_min",
                        "speedup_max",
                        "top1_pct",
                        "top1_ci_low_pct",
                        "top1_ci_high_pct",
                        "eval_images",
                        "agreement_pct",
                        "size_mb",
                        "build_seconds",
                        "peak_rss_mb",
                        "gflops_per_s",
                        "intensity_flop_per_byte",
                        "peak_pct",
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
            if r.get("baseline"):
                mlflow.set_tag("baseline", r["baseline"])
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
