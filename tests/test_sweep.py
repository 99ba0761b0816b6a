"""`python -m stages.sweep -m ...`: a Hydra multirun of the whole pipeline, in a subprocess.

One sweep covers the end-to-end promises, because each full job costs ~50 s on 2 cores: 3 jobs
(`train.mode=linear_probe,full,bogus`) through `hydra/launcher=submitit_local`, so they run at the
same time: `bogus` fails validation, the other two run every stage and contend for the shared
data and the benchmark lock. The default (basic, sequential) launcher runs the same job code; the
README gives its timing and joblib's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from conftest import mirror_overrides
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from stages import download, prepare
from stages import sweep as sweep_module
from stages.config import CONF_DIR, PROJECT_ROOT, compose, path
from stages.io import read_csv, write_json

# test_pipeline.py's tiny settings, as command-line overrides.
TINY = ["data.image_size=48", "data.fetch.backoff=0.01", "data.fetch.retries=3",
        "data.fetch.timeout=5", "data.fetch.workers=4",
        "model=mobilenet_v3_small", "model.weights=none", "model.input_size=48",
        "train.epochs=1", "train.num_workers=0", "train.precision=fp32",
        "train.system_metrics=false", "train.log_model=false",
        "export.formats=[onnx]", "export.verify_batch_sizes=[1,2]",
        "optimize.variants=[onnxruntime_fp32]", "optimize.calibration_images=8",
        "benchmark.threads=1", "benchmark.protocols.default.batch_sizes=[2]",
        "benchmark.protocols.default.warmup_iters=1",
        "benchmark.protocols.default.warmup_seconds=0",
        "benchmark.protocols.default.min_iters=2", "benchmark.protocols.default.min_seconds=0",
        "benchmark.protocols.default.trials=2"]


@pytest.mark.parametrize("option", sorted(
    f"hydra/{f.parent.name}={f.stem}" for f in (CONF_DIR / "hydra").glob("*/*.yaml")))
def test_hydra_options_compose_and_jobs_get_their_paths(option: str, tmp_path: Path,
                                                        monkeypatch) -> None:
    """Every conf/hydra option composes (with its plugin); a job's config, Hydra's node included,
    validates with its own root and the data folder its data config names."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfgs = [hydra_compose("config", [option, *extra], return_hydra_config=True)
                for extra in ([], ["data.image_size=64"], ["data.fetch.workers=2"])]
    output = OmegaConf.to_container(cfgs[0].hydra, resolve=False)
    assert output["sweep"]["subdir"] == "job${hydra.job.num}" and not output["job"]["chdir"]
    jobs = [sweep_module.job_config(c, tmp_path / f"job{i}", tmp_path, PROJECT_ROOT,
                                    {"sweep_job": str(i)}) for i, c in enumerate(cfgs)]
    assert Path(jobs[0].paths.root) == tmp_path / "job0"
    assert Path(jobs[0].data.folder) == PROJECT_ROOT / "photos"  # not under the job folder
    assert jobs[0].tracking.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert dict(jobs[1].tracking.tags) == {"sweep_job": "1"}
    data = [Path(j.paths.prepared).parent for j in jobs]
    assert data[0] != data[1] and data[0] == data[2]  # image size is data, fetch workers not
    assert data[0].parent == tmp_path / "shared" and Path(jobs[0].paths.cache).parent == data[0]


def test_jobs_at_the_same_time_download_and_prepare_a_data_config_once(tmp_path: Path,
                                                                       monkeypatch) -> None:
    """Three jobs (threads: `flock` excludes two opens of one file in one process as it does two
    processes) reach the shared data at once; the first works, the others wait and reuse."""
    calls = []

    def slow(stage: str):
        def run(cfg):
            calls.append(stage)
            time.sleep(0.5)  # long enough for the other jobs to arrive meanwhile
            write_json(path(cfg, "metrics") / f"{stage}.json", {"stage": stage})
        return run

    monkeypatch.setattr(download, "run", slow("download"))
    monkeypatch.setattr(prepare, "run", slow("prepare"))
    jobs = [sweep_module.job_config(compose(["tracking.enabled=false", f"train.lr={lr}"]),
                                    tmp_path / f"job{i}", tmp_path, PROJECT_ROOT, {})
            for i, lr in enumerate((1e-3, 1e-2, 1e-1))]
    timings = [{} for _ in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        reused = list(pool.map(sweep_module.shared_data, jobs, timings))
    assert calls == ["download", "prepare"]
    assert sorted(reused) == [False, True, True]
    for job, t, r in zip(jobs, timings, reused, strict=True):
        assert (path(job, "metrics") / "prepare.json").is_file()
        assert r is False or t["data_lock_wait_s"] > 0.5


def sweep(sweep_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([sys.executable, "-m", "stages.sweep", "-m",
                           f"hydra.sweep.dir={sweep_dir}", *overrides],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=540, env=env)


def test_parallel_sweep_shares_data_serialises_benchmarks_and_reports_failures(
        tmp_path: Path, mirror) -> None:
    root, db = tmp_path / "sweep", tmp_path / "mlflow.db"
    out = sweep(root, "hydra/launcher=submitit_local", *mirror_overrides(mirror), *TINY,
                f"tracking.uri=sqlite:///{db}", "train.mode=linear_probe,full,bogus")
    logs = out.stdout + out.stderr + "".join(
        f.read_text(errors="replace") for f in root.rglob("*.log"))
    assert out.returncode == 1, logs  # a job failed: the sweep says so

    # the failure: its overrides and error in one line; its folder holds no report
    failures = [json.loads(line) for line in (root / "sweep_failures.jsonl").read_text()
                .splitlines()]
    assert [f["job"] for f in failures] == [2], failures
    assert "train.mode=bogus" in failures[0]["overrides"]
    assert "invalid value 'bogus' for 'train.mode'" in failures[0]["error"]
    assert not (root / "job2" / "reports").exists()
    assert json.loads((root / "job2" / "metrics" / "sweep.json").read_text())["status"] == "failed"
    assert "invalid value 'bogus' for 'train.mode'" in logs

    # the two others ran every stage, each in its own folder
    jobs = {}
    for num, mode in ((0, "linear_probe"), (1, "full")):
        job = root / f"job{num}"
        assert (job / "reports" / "REPORT.md").is_file(), logs
        record = json.loads((job / "metrics" / "sweep.json").read_text())
        assert record["status"] == "ok" and record["job"] == num
        assert f"train.mode={mode}" in record["overrides"]
        assert yaml.safe_load((job / "job_config.yaml").read_text())["train"]["mode"] == mode
        assert f"train.mode={mode}" in (job / ".hydra" / "overrides.yaml").read_text()
        assert json.loads((job / "metrics" / "benchmark.json").read_text())["rows"]
        assert record["benchmark_serialized"] is True
        jobs[num] = record

    # one shared data folder, downloaded by one job and reused by the other: each file once (the
    # lock that makes it so when both arrive at once: test_jobs_at_the_same_time_...)
    shared = list((root / "shared").iterdir())
    assert len(shared) == 1 and jobs[0]["data_dir"] == jobs[1]["data_dir"] == str(shared[0])
    assert sorted(r["data_reused"] for r in jobs.values()) == [False, True]
    assert not (root / "job0" / "data").exists() and not (root / "job1" / "data").exists()
    images = [p for p in mirror.requests if p.endswith(".jpg")]
    assert len(images) >= len(read_csv(shared[0] / "raw" / "labels.csv")) > 0
    assert max(mirror.requests.values()) == 1, mirror.requests.most_common(3)
    for job in ("job0", "job1"):  # the job that reused the data still has the data metrics
        assert (root / job / "metrics" / "download.json").is_file()

    # the benchmarks took turns
    first, second = sorted(jobs.values(), key=lambda r: r["benchmark_started"])
    assert first["benchmark_ended"] <= second["benchmark_started"]

    # each job's MLflow parent run carries the sweep, its number and its overrides
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("oi-pipeline")
    parents = [r for r in client.search_runs([exp.experiment_id])
               if "mlflow.parentRunId" not in r.data.tags]
    tags = {r.data.tags.get("sweep_job"): r.data.tags for r in parents}
    assert set(tags) == {"0", "1"}, tags
    for num, mode in ((0, "linear_probe"), (1, "full")):
        assert tags[str(num)]["sweep_name"] == "sweep"
        assert f"train.mode={mode}" in tags[str(num)]["sweep_overrides"]
        assert tags[str(num)]["sweep_benchmark_serialized"] == "true"


def test_the_default_launcher_runs_on_after_a_failing_job(tmp_path: Path) -> None:
    """One after another in one process: job 0 fails, job 1 still runs (and fails its own way)."""
    root = tmp_path / "sweep"
    out = sweep(root, "tracking.enabled=false", "train.mode=bogus,also_bogus")
    assert out.returncode == 1, out.stdout + out.stderr
    failures = [json.loads(line) for line in (root / "sweep_failures.jsonl").read_text()
                .splitlines()]
    assert [(f["job"], f["overrides"][-1]) for f in failures] == [
        (0, "train.mode=bogus"), (1, "train.mode=also_bogus")]
    assert "invalid value 'also_bogus' for 'train.mode'" in failures[1]["error"]
