"""The CPU targets of the benchmark issue, checked against what a pipeline run measured.

    python benchmarks/cpu_targets.py [--root .] [--batch 32] [--seconds 10] [--out FILE]

Reads `metrics/benchmark.json` and `metrics/optimize/*.json` under `--root` (a finished
`dvc repro`), then:

1. the best variant whose accuracy verdict is not `fail` runs at >= 3x the eager fp32 baseline
   (channels_last, inference_mode) at `--batch`;
2. INT8 top-1 (every int8 variant) is not worse than fp32 by more than 1.5 points: its paired
   verdict on the held-out images is not `fail` (an `undecided` one is reported as such);
3. the pipeline's ONNX Runtime fp32 throughput is within 10% of a plain `onnxruntime` loop on the
   same file: a bare `InferenceSession` with the same thread count, fed the same kind of real
   preprocessed test images, timed here with nothing of the pipeline in between.

Exits 1 when a target is missed; the figures are written to `--out`
(default benchmarks/results/cpu_targets.json). Run it on a quiet machine: the two throughput
figures of target 3 are measured minutes apart, so a busy neighbour shows up as a gap.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def plain_ort_loop(file: Path, batches: list[np.ndarray], threads: int, seconds: float) -> dict:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(file), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for b in batches:  # warm-up
        sess.run(None, {name: b})
    trials = []
    for _ in range(3):
        n, t0, i = 0, time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds / 3:
            sess.run(None, {name: batches[i % len(batches)]})
            n += len(batches[0])
            i += 1
        trials.append(n / (time.perf_counter() - t0))
    return {"throughput": statistics.median(trials), "trials": trials}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=ROOT)
    ap.add_argument("--params", type=Path, default=None, help="default: <root>/params.yaml")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/cpu_targets.json")
    args = ap.parse_args()

    from oipipe.core.config import load_params
    from oipipe.measure import evaluation
    from stages.benchmark import rotated_batches

    cfg = load_params(args.params or args.root / "params.yaml", [f"paths.root={args.root}"])
    bench = json.loads((args.root / cfg.paths.metrics / "benchmark.json").read_text())
    rows = bench["rows"]
    base = rows.get(f"eager_fp32.b{args.batch}")
    if not base or base["status"] != "ok":
        sys.exit(f"no eager fp32 row at batch {args.batch} in benchmark.json")
    ranked = sorted(
        (
            r
            for r in rows.values()
            if r["batch"] == args.batch and r["status"] == "ok" and r["verdict"] != "fail"
        ),
        key=lambda r: r["throughput"],
        reverse=True,
    )
    best = ranked[0]
    results: dict = {
        "machine": bench["machine"],
        "threads": bench["threads"],
        "batch": args.batch,
        "eager_fp32_throughput": base["throughput"],
        "ranking": [
            {
                k: r[k]
                for k in (
                    "variant",
                    "verdict",
                    "throughput",
                    "speedup",
                    "top1_pct",
                    "top1_ci_low_pct",
                    "top1_ci_high_pct",
                    "latency_p50_ms",
                    "latency_p99_ms",
                )
            }
            for r in ranked
        ],
    }
    targets = {}
    targets["best_at_least_3x"] = {
        "variant": best["variant"],
        "speedup": best["speedup"],
        "ok": best["speedup"] >= 3.0,
    }
    int8 = {}
    for f in sorted((args.root / cfg.paths.metrics / "optimize").glob("*.json")):
        rec = json.loads(f.read_text())
        if rec["precision"] == "int8" and rec["status"] == "ok":
            int8[rec["variant"]] = {
                k: rec[k]
                for k in (
                    "top1_pct",
                    "fp32_top1_pct",
                    "top1_delta_pct",
                    "top1_delta_ci_low_pct",
                    "top1_delta_ci_high_pct",
                    "agreement_pct",
                    "eval_images",
                    "verdict",
                    "verdict_reason",
                )
            }
            int8[rec["variant"]]["ok"] = rec["verdict"] != "fail"
    targets["int8_within_1.5_points"] = {
        "variants": int8,
        "ok": bool(int8) and all(v["ok"] for v in int8.values()),
    }

    ort_row = rows.get(f"onnxruntime_fp32.b{args.batch}")
    if ort_row and ort_row["status"] == "ok":
        meta = json.loads(
            (args.root / cfg.paths.optimized / "onnxruntime_fp32" / "meta.json").read_text()
        )
        images, _ = evaluation.images(
            args.root / cfg.paths.prepared, cfg.optimize.eval_splits, meta
        )
        batches = [
            np.ascontiguousarray(b.numpy())
            for b in rotated_batches(images, args.batch, cfg.benchmark.input_batches)
        ]
        plain = plain_ort_loop(
            args.root / cfg.paths.optimized / "onnxruntime_fp32" / "model.onnx",
            batches,
            bench["threads"],
            args.seconds,
        )
        ratio = ort_row["throughput"] / plain["throughput"]
        targets["ort_fp32_within_10pct_of_plain_loop"] = {
            "pipeline": ort_row["throughput"],
            "plain": plain["throughput"],
            "plain_trials": plain["trials"],
            "ratio": ratio,
            "ok": abs(ratio - 1) <= 0.10,
        }
    else:
        targets["ort_fp32_within_10pct_of_plain_loop"] = {
            "ok": False,
            "why": "no ok onnxruntime_fp32 row",
        }
    results["targets"] = targets
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(targets, indent=2))
    return 0 if all(t["ok"] for t in targets.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
