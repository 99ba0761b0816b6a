"""The real DVC pipeline and MLflow tracking, in a throwaway copy of the project."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import git_dvc_init, run_stage, write_params
from mlflow.tracking import MlflowClient

from oipipe.core.config import PROJECT_ROOT, compose, path
from oipipe.core.config import write_params as compose_params
from oipipe.core.files import read_csv

BIN = Path(sys.executable).parent
# What each GPU variant lacks on this machine (None: nothing, it builds), asked of the machine
# itself rather than of the optimize stage: the stage must build it here, or record "skipped"
# with exactly this reason.
HAS_CUDA = torch.cuda.is_available()
HAS_TORCH_TRT = importlib.util.find_spec("torch_tensorrt") is not None
GPU_VARIANTS_LACK = {
    "trt_fp16": (
        "torch_tensorrt not installed"
        if not HAS_TORCH_TRT
        else None
        if HAS_CUDA
        else "no CUDA device"
    ),
    "eager_fp16_cuda": None if HAS_CUDA else "no CUDA device",
}


def sh(*cmd: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run(
        cmd,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", **(env or {})},
    )
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}"
    return out


def only_run(db: Path):
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("oi-pipeline")
    runs = [
        r
        for r in client.search_runs([exp.experiment_id])
        if "mlflow.parentRunId" not in r.data.tags
    ]  # benchmark rows are nested children
    assert len(runs) == 1, f"expected one pipeline run, got {len(runs)}"
    return client, runs[0]


@pytest.fixture
def project(tmp_path: Path, mirror) -> Path:
    """A git+DVC copy of the project whose `data` default is the test mirror."""
    dst = tmp_path / "project"
    dst.mkdir()
    # the stages, the library they import, and photos/ (data.folder, a download dependency)
    for name in ("conf", "stages", "oipipe", "photos"):
        shutil.copytree(
            PROJECT_ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__")
        )
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(PROJECT_ROOT / name, dst / name)
    (dst / "conf" / "data" / "test.yaml").write_text(f"""
defaults: [mirror, _self_]
metadata_url: {mirror.metadata_url}
images_url: {mirror.images_url}
image_size: 48
""")
    (dst / "conf" / "runtime" / "test.yaml").write_text(
        "defaults: [default, _self_]\ntrain_workers: 0\nsystem_metrics: false\nlog_model: false\n"
        "fetch: {backoff: 0.01, retries: 3, timeout: 5, workers: 4}\n"
    )
    (dst / "conf" / "model" / "test.yaml").write_text(
        "defaults: [efficientnet_lite0, _self_]\ninput_size: 48\n"
    )
    (dst / "conf" / "train" / "test.yaml").write_text("defaults: [default, _self_]\nepochs: 1\n")
    # every format and variant is covered by test_export and test_optimize; the cheapest ones
    # (ONNX, which the ORT variants read) keep this DVC run short, and the two GPU variants
    # (TensorRT and plain CUDA) run or record their skip through DVC as on any machine
    (dst / "conf" / "export" / "test.yaml").write_text(
        "defaults: [default, _self_]\nformats: [onnx]\nverify_batch_sizes: [1, 2]\n"
    )
    (dst / "conf" / "optimize" / "test.yaml").write_text(
        "defaults: [default, _self_]\nvariants: [onnxruntime_fp32, trt_fp16, eager_fp16_cuda]\n"
        "calibration_images: 8\n"
    )
    (dst / "conf" / "benchmark" / "test.yaml").write_text(
        "defaults: [default, _self_]\nthreads: 1\npresets:\n  default:\n"
        "    batch_sizes: [2]\n    warmup_iters: 1\n    warmup_seconds: 0\n"
        "    min_iters: 2\n    min_seconds: 0\n    trials: 2\n"
    )
    (dst / "conf" / "profile" / "test.yaml").write_text(
        "defaults: [default, _self_]\nmodes: [eager]\nbatch_sizes: [2]\nwarmup: 1\niterations: 2\n"
    )
    config = dst / "conf" / "config.yaml"
    config.write_text(
        config.read_text()
        .replace("data: default", "data: test")
        .replace("profile: default", "profile: test")
        .replace("export: default", "export: test")
        .replace("optimize: default", "optimize: test")
        .replace("benchmark: default", "benchmark: test")
        .replace("model: efficientnet_lite0", "model: test")
        .replace("train: default", "train: test")
        .replace("runtime: default", "runtime: test")
    )
    compose_params(dst / "params.yaml", config_dir=dst / "conf")
    git_dvc_init(dst)
    return dst


@pytest.mark.slow
@pytest.mark.timeout(1200)  # two DVC runs of every stage; 600 s is the hang guard per command
def test_dvc_repro_then_noop_then_exp_run_reruns_from_prepare(project: Path, mirror) -> None:
    first = sh("dvc", "repro", cwd=project)
    for stage in (
        "download",
        "prepare",
        "train",
        "export",
        "optimize@onnxruntime_fp32",
        "optimize@trt_fp16",
        "optimize@eager_fp16_cuda",
        "benchmark",
        "profile",
        "report",
    ):
        assert f"Running stage '{stage}'" in first.stdout
    assert (project / "artifacts" / "optimized" / "onnxruntime_fp32" / "model.onnx").is_file()
    bench = json.loads((project / "metrics" / "benchmark.json").read_text())
    for variant, missing in GPU_VARIANTS_LACK.items():
        rec = json.loads((project / "metrics" / "optimize" / f"{variant}.json").read_text())
        if missing is None:
            assert (rec["status"], rec["error"]) == ("ok", None), rec
        else:
            assert rec["status"] == "skipped" and rec["reason"].startswith(missing), rec
            assert rec["artifact"] is None and "top1_pct" not in rec, rec
        assert bench["rows"][f"{variant}.b2"]["status"] == rec["status"], bench["rows"]
    assert bench["rows"]["onnxruntime_fp32.b2"]["status"] == "ok", bench["rows"]
    assert bench["rows"]["eager_fp32.b2"]["speedup"] == 1.0
    report = (project / "reports" / "REPORT.md").read_text()
    assert all(v in report for v in ("onnxruntime_fp32", "trt_fp16", "eager_fp16_cuda"))
    labels = read_csv(project / "data" / "raw" / "labels.csv")
    assert len(labels) == 30
    assert len(read_csv(project / "data" / "prepared" / "train.csv")) == 24

    # both stages, two processes, one MLflow run (SQLite file in the project root)
    client, run = only_run(project / "mlflow.db")
    assert run.data.metrics["download.downloaded"] == 30
    assert run.data.metrics["prepare.train.images"] == 24
    assert run.data.metrics["train.epochs_run"] == 1
    assert run.data.params["data.image_size"] == "48"
    assert run.data.params["optimize.onnxruntime_fp32.backend"] == "onnxruntime"
    assert run.data.params["optimize.trt_fp16.precision"] == "fp16"
    assert "optimize.onnxruntime_fp32.top1_pct" in run.data.metrics
    artifacts = {
        a.path for d in ("download", "prepare") for a in client.list_artifacts(run.info.run_id, d)
    }
    assert {"download/labels.csv", "download/stats.csv", "prepare/stats.csv"} <= artifacts
    # the run tells the report's story: percentages, verdicts, names, the data it used
    m, tags = run.data.metrics, run.data.tags
    train_json = json.loads((project / "metrics" / "train.json").read_text())
    assert m["train.test_acc_pct"] == pytest.approx(train_json["test_acc_pct"])
    assert m["train.best_val_acc_pct"] == pytest.approx(train_json["best_val_acc_pct"])
    ort = json.loads((project / "metrics" / "optimize" / "onnxruntime_fp32.json").read_text())
    assert m["optimize.onnxruntime_fp32.top1_pct"] == pytest.approx(ort["top1_pct"])
    assert (
        m["optimize.onnxruntime_fp32.verdict_code"]
        == {"pass": 1, "undecided": 0, "fail": -1}[ort["verdict"]]
    )
    assert tags["optimize.onnxruntime_fp32.verdict"] == ort["verdict"]
    assert tags["benchmark.best_variant"] == bench["best_variant"] == tags["benchmark.winner.b2"]
    assert run.info.run_name == f"efficientnet_lite0-lp_ft-{tags['pipeline_key'][:8]}"
    assert "train.lr_head" in m and "train.lr" not in m
    assert m["export.onnx.batch2.top1_agreement_pct"] == 100.0  # verified: all agree, in percent
    (data,) = run.inputs.dataset_inputs
    assert data.dataset.name.startswith("openimages: ") and data.dataset.digest
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    children = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'"
    )
    assert len(children) == len(bench["rows"])
    for c in children:
        row = bench["rows"][c.data.tags["benchmark.row"].replace("@", ".")]
        assert c.info.status == {"ok": "FINISHED", "skipped": "KILLED"}.get(row["status"], "FAILED")
        assert c.data.tags["model.name"] == "efficientnet_lite0"
        assert c.data.tags["pipeline_key"] == tags["pipeline_key"]

    sh("git", "add", "-A", cwd=project)
    sh("git", "commit", "-qm", "repro", cwd=project)
    mirror.reset_counts()
    second = sh("dvc", "repro", cwd=project)
    assert "Running stage" not in second.stdout
    assert not mirror.requests

    # a Hydra override recomposes params.yaml; image_size reruns prepare (and so train), never
    # download (the experiment stops at train: what runs after it is the first run's DAG again)
    exp = sh("dvc", "exp", "run", "-S", "data.image_size=40", "train", cwd=project)
    assert "Running stage 'prepare'" in exp.stdout and "Running stage 'train'" in exp.stdout
    assert "Running stage 'download'" not in exp.stdout
    assert not mirror.requests
    assert "image_size: 40" in (project / "params.yaml").read_text()
    shows = json.loads(sh("dvc", "metrics", "show", "--json", cwd=project).stdout)
    files = next(iter(shows.values()))["data"]  # keyed by revision; "" is the workspace
    assert {
        "metrics/download.json",
        "metrics/prepare.json",
        "metrics/train.json",
        "metrics/export.json",
        "metrics/optimize/onnxruntime_fp32.json",
        "metrics/benchmark.json",
    } <= set(files)
    assert files["metrics/benchmark.json"]["data"]["rows"]["eager_fp32.b2"]["status"] == "ok"
    assert files["metrics/train.json"]["data"]["epochs_run"] == 1
    plots = json.loads(sh("dvc", "plots", "show", "--json", cwd=project).stdout)
    assert not plots.get("errors"), plots.get("errors")
    assert {"loss", "accuracy", "throughput", "speedup", "latency", "plots/confusion.csv"} <= set(
        plots["data"]
    )


@pytest.mark.slow
def test_mlflow_tracking_uri_env_wins_and_stages_share_the_run(
    make_cfg, mirror, tmp_path: Path
) -> None:
    cfg = make_cfg("tracking.enabled=true", srv=mirror)
    params = write_params(cfg, tmp_path / "params.yaml")
    db = tmp_path / "elsewhere.db"
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    for stage in ("download", "prepare"):
        out = run_stage(stage, params, env=env)
        assert out.returncode == 0, out.stderr
    assert not (path(cfg, "root") / "mlflow.db").exists()
    _, run = only_run(db)
    assert {"download.downloaded", "prepare.classes"} <= set(run.data.metrics)
    assert run.data.tags["git_commit"]


def test_entry_point_exit_codes(tmp_path: Path, mirror) -> None:
    cfg = compose(
        [
            f"paths.root={tmp_path}",
            "tracking.enabled=false",
            "data=mirror",
            f"data.metadata_url={mirror.metadata_url}",
            f"data.images_url={mirror.images_url}",
        ]
    )
    params = write_params(cfg, tmp_path / "params.yaml")
    bad = run_stage("download", params, "data.classes=[Sea turtel]")
    assert bad.returncode == 2 and "did you mean 'Sea turtle'" in bad.stderr
    wrong_type = run_stage("download", params, "data.seed=abc")
    assert wrong_type.returncode == 2 and "data.seed" in wrong_type.stderr
    assert not mirror.requests
    # nothing listens on port 1: the network gives up with one clear line, not a traceback
    offline = run_stage(
        "download",
        params,
        "data.metadata_url=http://127.0.0.1:1/",
        "runtime.fetch.retries=1",
        "runtime.fetch.backoff=0.01",
    )
    assert offline.returncode == 1
    assert "download failed:" in offline.stderr and "gave up after 1 retries" in offline.stderr
    assert "Traceback" not in offline.stderr
