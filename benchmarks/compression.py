"""The compressions beside their post-training twins on one pipeline run, and what each costs to
build: quantization-aware training, channel pruning and both together.

    python benchmarks/compression.py [--workdir /tmp/oi-pipeline-realdata]
                                     [--variants openvino_qat_int8,openvino_pruned_fp32,...]
                                     [--out benchmarks/results/compression_cpu.json]
                                     [--data realdata] [--no-bench] [KEY=VALUE ...]

`--workdir` is a folder where the default pipeline has run at least to the optimize stage
(`benchmarks/realdata_pipeline.py` leaves one: its `data=realdata` config, the photos it names).
This checkout's code and conf are copied into it and params.yaml recomposed with the same data
overrides, then each compression variant is built by the real optimize stage in a fresh process
of its own, timed, its peak memory read from the kernel (the child's maximum resident set,
`os.wait4`). The pruned variants share one pruned, fine-tuned model (`paths.cache/pruned`): the
first pruned variant's cost includes pruning and its fine-tune, the cache is cleared first so it
is measured. Then the benchmark stage times `openvino_fp32`, `openvino_int8` and the compressions
interleaved (the eager baselines with them) and the script writes to `--out`:

- the machine (CPU model and flags);
- per compression: build wall seconds and peak RSS, its record's top-1 with interval and verdict,
  the paired comparison with its post-training start (QAT), parameters, GFLOPs and the layers
  pruned (pruning), and at each batch size its images/s, its speed-up over the eager baseline and
  over `openvino_int8` (the median of per-round ratios);
- the goal's check: at least 1.3x `openvino_int8` at batch 1 and 32 with a verdict not `fail`.

The benchmark overwrites the workdir's metrics/benchmark.json (the realdata script has read it by
then). Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
COMPRESSIONS = (
    "openvino_ac_int8",
    "openvino_qat_int8",
    "openvino_pruned_fp32",
    "openvino_pruned_int8",
    "openvino_pruned_qat_int8",
)
TIMED = ("openvino_fp32", "openvino_int8")
GOAL = 1.3  # over openvino_int8, at batch 1 and 32, verdict not fail
RECORD_KEYS = (
    "status",
    "error",
    "build_seconds",
    "size_mb",
    "top1_pct",
    "top1_ci_low_pct",
    "top1_ci_high_pct",
    "top1_delta_pct",
    "top1_delta_ci_low_pct",
    "top1_delta_ci_high_pct",
    "verdict",
    "eval_images",
    "int8_layers",
    "post_training_top1_pct",
    "vs_post_training_delta_pct",
    "vs_post_training_ci_low_pct",
    "vs_post_training_ci_high_pct",
    "vs_post_training_worse",
    "vs_post_training_better",
    "qat_epochs_run",
    "qat_best_epoch",
    "qat_val_losses",
    "pruned_ratio",
    "params_before",
    "params_after",
    "gflops_before",
    "gflops_after",
    "pruned_layers",
    "pruned_epochs_run",
    "pruned_best_epoch",
    "pruned_val_losses",
)


def measured(cmd: list[str], cwd: Path) -> tuple[float, float, str]:
    """(wall seconds, peak resident MiB of the child, its stderr's tail); exits on failure."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    t0 = time.perf_counter()
    with open(cwd / ".compression-stderr", "w+") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        err.seek(0)
        tail = err.read()[-4000:]
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"{' '.join(cmd)} failed ({code}):\n{tail}")
    print(f"{' '.join(cmd[2:])}: {wall:.0f} s, {usage.ru_maxrss / 1024:.0f} MiB", flush=True)
    return round(wall, 1), round(usage.ru_maxrss / 1024, 1), tail


def per_round(a: dict | None, b: dict | None) -> float | None:
    """a's speed over b's, the median of per-round ratios (the report's own rule)."""
    from oipipe.reporting.compression import speed_ratio

    if not a or not b or a.get("status") != "ok" or b.get("status") != "ok":
        return None
    return round(speed_ratio(a, b), 3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/oi-pipeline-realdata"))
    ap.add_argument("--variants", default=",".join(COMPRESSIONS))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/compression_cpu.json")
    ap.add_argument("--data", default="realdata", help="the data config the workdir ran with")
    ap.add_argument("--no-bench", action="store_true", help="build only, no benchmark")
    ap.add_argument(
        "overrides", nargs="*", help="config overrides, e.g. optimize.settings.pruned.ratio=0.5"
    )
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from omegaconf import OmegaConf

    from oipipe.core.config import load_params, path, write_params
    from oipipe.measure.machine import machine_info

    work = args.workdir.resolve()
    old = OmegaConf.load(work / "params.yaml")
    if not (work / "metrics" / "export.json").is_file():
        sys.exit(f"{work}: no pipeline run to the export stage here (run realdata_pipeline.py)")
    for name in ("conf", "stages", "oipipe"):
        shutil.rmtree(work / name)
        shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    overrides = [f"data={args.data}", f"data.folder={old.data.folder}", *args.overrides]
    write_params(work / "params.yaml", overrides, config_dir=work / "conf")
    cfg = load_params(work / "params.yaml")

    def at(key: str) -> Path:  # paths.* are relative to the workdir (paths.root ".")
        return work / path(cfg, key)

    shutil.rmtree(at("cache") / "pruned", ignore_errors=True)  # measure the fine-tune
    shutil.rmtree(at("cache") / "qat", ignore_errors=True)

    variants = [v for v in args.variants.split(",") if v]
    costs = {}
    py = [sys.executable, "-m"]
    for v in variants:
        wall, rss, _ = measured([*py, "stages.optimize", "--variant", v], work)
        costs[v] = {"wall_seconds": wall, "peak_rss_mib": rss}
    records = {
        v: json.loads((at("metrics") / "optimize" / f"{v}.json").read_text())
        for v in (*TIMED, *variants)
    }

    out: dict = {
        "command": "python " + " ".join(sys.argv),
        "machine": machine_info(),
        "workdir": str(work),
        "data": overrides,
        "settings": {
            k: OmegaConf.to_container(cfg.optimize.settings[k])
            for k in ("openvino_qat_int8", "pruned", "openvino_int8")
        },
        "variants": {},
    }
    bench = None
    if not args.no_bench:
        timed = [v for v in (*TIMED, *variants) if records[v]["status"] == "ok"]
        cmd = [*py, "stages.benchmark", f"benchmark.presets.default.variants=[{','.join(timed)}]"]
        wall, rss, _ = measured(cmd, work)
        out["benchmark_seconds"] = wall
        bench = json.loads((at("metrics") / "benchmark.json").read_text())
        out["baselines"] = bench.get("baselines")
        out["peaks"] = bench.get("peaks")
    for v in (*TIMED, *variants):
        rec = records[v]
        row = {k: rec.get(k) for k in RECORD_KEYS if rec.get(k) is not None}
        row.update(costs.get(v, {}))
        if bench is not None:
            rows = bench["rows"]
            for b in bench.get("batch_sizes") or sorted({r["batch"] for r in rows.values()}):
                mine = rows.get(f"{v}.b{b}")
                if not mine:
                    continue
                row[f"b{b}"] = {
                    "throughput": mine.get("throughput"),
                    "speedup_over_baseline": mine.get("speedup"),
                    "baseline": mine.get("baseline"),
                    "over_openvino_int8": per_round(mine, rows.get(f"openvino_int8.b{b}")),
                    "peak_pct": mine.get("peak_pct"),
                    "intensity_flop_per_byte": mine.get("intensity_flop_per_byte"),
                }
            over = [row.get(f"b{b}", {}).get("over_openvino_int8") for b in (1, 32)]
            row["meets_goal"] = (
                all(x is not None and x >= GOAL for x in over) and rec.get("verdict") != "fail"
            )
        out["variants"][v] = row
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
