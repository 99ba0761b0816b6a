"""The whole pipeline on real photographs, with the default config, and the figures that say
whether its verdicts are right.

    python benchmarks/realdata_pipeline.py [--photos ../shared/realdata] [--workdir DIR]
                                           [--out benchmarks/results/realdata_cpu.json]
                                           [--project CHECKOUT]

Copies the project (its working tree, or `--project`'s: an older checkout, to time the code before
a change on the same machine: conf, stages, photos, dvc.yaml) into `--workdir`, composes
`params.yaml` with `data=realdata data.folder=<photos>` and nothing else changed, runs the real
`dvc repro` there (download, prepare, train, export, every optimize variant, benchmark, report),
in three timed steps (up to every optimize variant, the benchmark alone, the rest), then trains
the linear probe the issue compared against (`train.recipe=linear_probe
train.lr=0.01`) on the same prepared split, and writes to `--out`:

- the machine (CPU model and the flags that decide bf16/int8 kernels);
- training: test accuracy with its Wilson interval and n, the chosen epoch and what chose it,
  the precision picked; and the linear probe's test accuracy on the same images;
- each optimize variant's status, top-1 with interval, paired difference to fp32 with its
  interval, and verdict;
- the benchmark's baselines (channels_last and NCHW) and the winner at each batch size, its
  rows (with each row's roofline point where the benchmark measured one) and the peaks;
- the seconds of each step, the benchmark's on its own.

It exits 1 when the default recipe's test accuracy is below the linear probe's. Run it on a quiet
machine: the benchmark's figures are throughputs measured minutes apart.
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


def sh(*cmd: str, cwd: Path) -> str:
    t0 = time.perf_counter()
    out = subprocess.run(
        cmd,
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"},
    )
    if out.returncode != 0:
        sys.exit(
            f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-4000:]}\n"
            f"{out.stderr[-4000:]}"
        )
    print(f"{' '.join(cmd)}: {time.perf_counter() - t0:.0f} s", flush=True)
    return out.stdout


def copy_project(dst: Path, project: Path = ROOT) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for name in ("conf", "stages", "oipipe", "photos"):
        shutil.copytree(project / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(project / name, dst / name)
    sh("git", "init", "-q", cwd=dst)
    sh("git", "config", "user.email", "bench@localhost", cwd=dst)
    sh("git", "config", "user.name", "bench", cwd=dst)
    sh("dvc", "init", "-q", cwd=dst)
    sh("dvc", "config", "hydra.enabled", "true", cwd=dst)


def load(file: Path) -> dict:
    return json.loads(file.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", type=Path, default=ROOT.parent / "shared" / "realdata")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/oi-pipeline-realdata"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/realdata_cpu.json")
    ap.add_argument(
        "--project", type=Path, default=ROOT, help="the checkout to run (default: this)"
    )
    args = ap.parse_args()
    photos = args.photos.resolve()
    if not photos.is_dir():
        sys.exit(f"{photos}: no such photo folder (class-per-folder images); pass --photos")

    sys.path.insert(0, str(ROOT))
    from oipipe.core.config import write_params
    from oipipe.measure.machine import machine_info

    work = args.workdir.resolve()
    copy_project(work, args.project.resolve())
    write_params(
        work / "params.yaml", ["data=realdata", f"data.folder={photos}"], config_dir=work / "conf"
    )
    sh("git", "add", "-A", cwd=work)
    sh("git", "commit", "-qm", "realdata run", cwd=work)
    steps = {}
    for step, cmd in (
        ("up_to_optimize", ("dvc", "repro", "optimize")),
        ("benchmark", ("dvc", "repro", "benchmark")),
        ("rest", ("dvc", "repro")),
    ):
        t0 = time.perf_counter()
        sh(*cmd, cwd=work)
        steps[step] = round(time.perf_counter() - t0, 1)
    pipeline_seconds = sum(steps.values())
    # the comparison: the linear probe at lr 0.01 on the same prepared split
    sh(
        sys.executable,
        "-m",
        "stages.train",
        "train.recipe=linear_probe",
        "train.lr=0.01",
        "paths.models=lp/models",
        "paths.metrics=lp/metrics",
        "paths.plots=lp/plots",
        "tracking.enabled=false",
        cwd=work,
    )

    m = work / "metrics"
    train, probe = load(m / "train.json"), load(work / "lp" / "metrics" / "train.json")
    keep = (
        "test_acc_pct",
        "test_acc_ci_low_pct",
        "test_acc_ci_high_pct",
        "test_images",
        "best_epoch",
        "epochs_run",
        "selected_by",
        "best_val_loss",
        "best_val_acc_pct",
        "val_images",
        "precision",
        "wall_time_s",
        "train_images_per_s",
    )
    variants = {}
    for f in sorted((m / "optimize").glob("*.json")):
        rec = load(f)
        variants[rec["variant"]] = {
            k: rec.get(k)
            for k in (
                "status",
                "reason",
                "top1_pct",
                "top1_ci_low_pct",
                "top1_ci_high_pct",
                "top1_delta_pct",
                "top1_delta_ci_low_pct",
                "top1_delta_ci_high_pct",
                "discordant_worse",
                "discordant_better",
                "agreement_pct",
                "verdict",
                "images_to_decide",
                "eval_images",
                "eval_splits",
            )
        }
    bench = load(m / "benchmark.json")
    rows = bench["rows"]
    baselines = {
        k: {c: r.get(c) for c in ("throughput", "latency_p50_ms", "latency_p99_ms", "speedup")}
        for k, r in rows.items()
        if r["variant"].startswith("eager_fp32")
    }
    result = {
        "what": "dvc repro, default config with data=realdata, then the linear probe (lr 0.01)",
        "photos": str(photos),
        "pipeline_seconds": round(pipeline_seconds, 1),
        "step_seconds": steps,
        "project": str(args.project.resolve()),
        "machine": machine_info(),
        "prepare": {k: v for k, v in load(m / "prepare.json").items() if k.endswith(".images")},
        "train": {k: train.get(k) for k in keep},
        "linear_probe": {k: probe.get(k) for k in keep},
        "variants": variants,
        "baselines": baselines,
        "winners": bench["winners"],
        "winners_throughput_mode": bench.get("winners_throughput_mode"),
        "baseline_per_batch": bench.get("baselines"),
        "peaks": bench.get("peaks"),
        "traffic": bench.get("traffic"),
        "load_before_after": [bench.get("load_before"), bench.get("load_after")],
        "benchmark_rows": {
            k: {
                c: r.get(c)
                for c in (
                    "status",
                    "throughput",
                    "latency_p99_ms",
                    "speedup",
                    "speedup_min",
                    "speedup_max",
                    "throughput_min",
                    "throughput_max",
                    "verdict",
                    "top1_pct",
                    "size_mb",
                    "gflops_per_s",
                    "peak_pct",
                    "intensity_flop_per_byte",
                    "throughput_concurrent",
                    "concurrency",
                    "concurrency_method",
                    "speedup_concurrent",
                )
            }
            for k, r in rows.items()
        },
        "report": (work / "reports" / "REPORT.md").read_text().split("\n## ", 1)[0],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(result["report"])
    ok = train["test_acc_pct"] >= probe["test_acc_pct"]
    print(
        f"default recipe test accuracy {train['test_acc_pct']:.3f} vs linear probe "
        f"{probe['test_acc_pct']:.3f}: {'ok' if ok else 'BELOW'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
