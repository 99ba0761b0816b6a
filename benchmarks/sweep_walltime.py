"""Wall time of one 2-job Hydra multirun of the whole pipeline, per launcher.

    python benchmarks/sweep_walltime.py [--launchers basic joblib submitit_local]
                                        [--out benchmarks/results/sweep_walltime.json]

Generates the loopback Open Images mirror the tests use (3 classes, 10 images each), serves it
on 127.0.0.1, and runs `python -m oitools.sweep -m train.recipe=linear_probe,full` at the tests'
tiny settings (tests/test_sweep.py: TINY) once per launcher, each sweep in a fresh folder (so each
downloads its data once), one after the other:

- `basic`: Hydra's default launcher, the jobs one after another in one process;
- `joblib`: `hydra/launcher=joblib hydra.launcher.n_jobs=2`, both jobs at once;
- `submitit_local`: both at once through submitit, the SLURM launcher's code path.

Writes each sweep's wall time, each job's seconds per stage and benchmark-lock wait (its
`metrics/sweep.json`), the load average before and after, and the machine. Run it on a quiet
machine: the point is the ratio between launchers, measured minutes apart.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_sweep import TINY  # noqa: E402  (the tests' tiny settings, one source)

from oimirror import MirrorServer, generate  # noqa: E402
from oipipe.core.files import write_json  # noqa: E402
from oipipe.measure import machine  # noqa: E402

LAUNCHERS = {
    "basic": [],
    "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    "submitit_local": ["hydra/launcher=submitit_local"],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--launchers", nargs="+", default=list(LAUNCHERS), choices=list(LAUNCHERS))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/sweep_walltime.json")
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    result = {
        "what": "2-job sweep (train.recipe=linear_probe,full) at the tests' tiny settings",
        "overrides": TINY,
        "machine": machine.machine_info(),
        "sweeps": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp) / "mirror", images_per_class=10, seed=0)
        with MirrorServer(Path(tmp) / "mirror") as srv:
            for name in args.launchers:
                root = Path(tmp) / name
                load = os.getloadavg()[0]
                t0 = time.perf_counter()
                out = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "oitools.sweep",
                        "-m",
                        f"hydra.sweep.dir={root}",
                        *LAUNCHERS[name],
                        "data=mirror",
                        f"data.metadata_url={srv.metadata_url}",
                        f"data.images_url={srv.images_url}",
                        *TINY,
                        "train.recipe=linear_probe,full",
                    ],
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                    env=env,
                )
                wall = time.perf_counter() - t0
                if out.returncode != 0:
                    sys.exit(f"{name} sweep failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
                jobs = [
                    json.loads(f.read_text()) for f in sorted(root.glob("job*/metrics/sweep.json"))
                ]
                result["sweeps"][name] = {
                    "wall_s": round(wall, 1),
                    "load_before": round(load, 2),
                    "load_after": round(os.getloadavg()[0], 2),
                    "jobs": [
                        {
                            "job": j["job"],
                            "total_s": j["seconds"].get("total_s"),
                            "seconds": j["seconds"],
                            "data_reused": j.get("data_reused"),
                        }
                        for j in jobs
                    ],
                }
                print(f"{name}: {wall:.0f} s (load average {load:.1f} before)", flush=True)
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
