"""A 3-model Hydra sweep of the whole pipeline on real photographs, and its one comparison.

    python benchmarks/realdata_sweep.py [--photos ../shared/realdata] [--workdir DIR]
                                        [--out benchmarks/results/realdata_sweep]

Runs `python -m oitools.sweep -m model=efficientnet_lite0,efficientnet_lite1,efficientnet_lite2`
(the three models whose ImageNet weights work offline) with `data=realdata` on `--photos`, the
default training recipe, and the ONNX Runtime fp32 and int8 variants (the CPU winner on these
photos in benchmarks/results/realdata_cpu.json; every variant would triple the time), one job
after another so that no benchmark shares the cores. Then `python -m oitools.compare --sweep` on
the sweep's store writes COMPARE.md/.html and the Pareto chart into `--out`, with `sweep.json`:
wall time, each job's seconds per stage, and the machine. Run it on a quiet machine.
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
sys.path.insert(0, str(ROOT))

from oipipe.core.files import write_json  # noqa: E402
from oipipe.measure import machine  # noqa: E402

MODELS = "efficientnet_lite0,efficientnet_lite1,efficientnet_lite2"
NAME = "realdata-3models"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", type=Path, default=ROOT.parent / "shared" / "realdata")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp") / NAME)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/realdata_sweep")
    args = ap.parse_args()
    if not args.photos.is_dir():
        sys.exit(f"no photos at {args.photos}")
    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    overrides = [
        f"model={MODELS}",
        "data=realdata",
        f"data.folder={args.photos.resolve()}",
        "optimize.variants=[onnxruntime_fp32,onnxruntime_int8]",
        f"++tracking.tags.sweep_name={NAME}",
    ]
    t0 = time.perf_counter()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "oitools.sweep",
            "-m",
            f"hydra.sweep.dir={args.workdir}",
            *overrides,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        sys.exit(f"sweep failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
    print(f"sweep: {wall:.0f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    cmp = subprocess.run(
        [
            sys.executable,
            "-m",
            "oitools.compare",
            "--sweep",
            NAME,
            "--tracking-uri",
            f"sqlite:///{args.workdir / 'mlflow.db'}",
            "--out",
            str(args.out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    if cmp.returncode != 0:
        sys.exit(f"compare failed:\n{cmp.stdout[-4000:]}\n{cmp.stderr[-4000:]}")
    jobs = [json.loads(f.read_text()) for f in sorted(args.workdir.glob("job*/metrics/sweep.json"))]
    write_json(
        args.out / "sweep.json",
        {
            "what": f"python -m oitools.sweep -m {' '.join(overrides)}",
            "photos": str(args.photos),
            "wall_s": round(wall, 1),
            "machine": machine.machine_info(),
            "jobs": [
                {k: j.get(k) for k in ("job", "overrides", "status", "seconds", "best_val_acc_pct")}
                for j in jobs
            ],
        },
    )
    print((args.out / "COMPARE.md").read_text()[:3000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
