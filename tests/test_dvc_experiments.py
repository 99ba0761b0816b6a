"""DVC's experiment queue and a DVC remote, on a reproduced throwaway copy of the project.

One project is built and reproduced up to `export` once per module, then both tests use it: the
queue test runs experiments from it, the remote test pushes it and pulls a clone. The queued
experiments track to MLflow (the project's store must hold their runs afterwards) and stop at
`train` (`dvc exp run --queue train`): export, optimize and benchmark would
more than double the queue's time (76 s against 197 s on 2 busy cores) and tell nothing more
about it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import git_dvc_init
from mlflow.tracking import MlflowClient

from oimirror import MirrorServer
from oipipe.core.config import PROJECT_ROOT, compose, path
from oipipe.core.config import write_params as compose_params

BIN = Path(sys.executable).parent
# DVC's daemons (the queue workers) start `dvc` by name: this venv's comes first on PATH.
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
# What DVC tracks: every output of the pipeline, and the metrics and plots kept in git.
OUTPUTS = ("data/raw", "data/prepared", "models", "artifacts", "metrics", "plots", "reports")


def sh(*cmd: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}"
    return out


def tree_hashes(root: Path, folders: tuple[str, ...] = OUTPUTS) -> dict[str, str]:
    return {
        str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
        for d in folders
        for f in sorted((root / d).rglob("*"))
        if f.is_file()
    }


def make_project(dst: Path, srv: MirrorServer) -> Path:
    """A git+DVC copy of the project with tiny settings whose data come from `srv`."""
    dst.mkdir()
    # the stages, the library they import, and photos/ (data.folder, a download dependency)
    for name in ("conf", "stages", "oipipe", "photos"):
        shutil.copytree(
            PROJECT_ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__")
        )
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(PROJECT_ROOT / name, dst / name)
    tiny = {
        "data": f"defaults: [mirror, _self_]\nmetadata_url: {srv.metadata_url}\n"
        f"images_url: {srv.images_url}\nimage_size: 48\n",
        "model": "defaults: [efficientnet_lite0, _self_]\ninput_size: 48\n",
        "train": "defaults: [default, _self_]\nepochs: 1\nprecision: fp32\n",
        "export": "defaults: [default, _self_]\nformats: [onnx]\nverify_batch_sizes: [1, 2]\n",
        "optimize": "defaults: [default, _self_]\nvariants: [onnxruntime_fp32]\n"
        "calibration_images: 8\n",
        "benchmark": "defaults: [default, _self_]\nthreads: 1\npresets:\n  default:\n"
        "    batch_sizes: [2]\n    warmup_iters: 1\n    warmup_seconds: 0\n"
        "    min_iters: 2\n    min_seconds: 0\n    trials: 2\n",
        "tracking": "defaults: [default, _self_]\nenabled: false\n",
        "runtime": "defaults: [default, _self_]\ntrain_workers: 0\nsystem_metrics: false\n"
        "log_model: false\nfetch: {backoff: 0.01, retries: 3, timeout: 5, workers: 4}\n",
    }
    config = dst / "conf" / "config.yaml"
    text = config.read_text()
    for group, body in tiny.items():
        (dst / "conf" / group / "test.yaml").write_text(body)
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(f"- {group}:"))
        text = text.replace(line, f"  - {group}: test")
    config.write_text(text)
    compose_params(dst / "params.yaml", config_dir=dst / "conf")
    git_dvc_init(dst)
    return dst


@pytest.fixture(scope="module")
def served(mirror_dir: Path) -> Iterator[MirrorServer]:
    with MirrorServer(mirror_dir) as srv:
        yield srv


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory: pytest.TempPathFactory, served: MirrorServer) -> Path:
    """The tiny project, reproduced up to `export` and committed (dvc.lock in git)."""
    project = make_project(tmp_path_factory.mktemp("exp") / "project", served)
    sh("dvc", "repro", "export", cwd=project)
    sh("git", "add", "-A", cwd=project)
    sh("git", "commit", "-qm", "baseline", cwd=project)
    return project


def test_only_a_relative_cache_resolves_against_dvc_root(monkeypatch, tmp_path: Path) -> None:
    cfg = compose(["tracking.enabled=false"])  # paths.root=. as under DVC
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # what DVC sets in a queued experiment
    assert path(cfg, "cache") == tmp_path / "data" / "cache"
    assert path(cfg, "raw") == Path("data/raw") and path(cfg, "root") == Path(".")
    elsewhere = compose([f"paths.root={tmp_path / 'job'}", "tracking.enabled=false"])
    assert path(elsewhere, "cache") == tmp_path / "job" / "data" / "cache"
    pinned = compose([f"paths.cache={tmp_path / 'pinned'}", "tracking.enabled=false"])
    assert path(pinned, "cache") == tmp_path / "pinned"
    monkeypatch.delenv("DVC_ROOT")  # outside DVC: relative to paths.root, as every other path
    assert path(cfg, "cache") == Path("data/cache")


def wait_for_queue(project: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = sh("dvc", "queue", "status", cwd=project).stdout
        if not any(word in status for word in ("Queued", "Running")):
            return status
        if time.monotonic() > deadline:
            sh("dvc", "queue", "stop", "--kill", cwd=project)
            pytest.fail(f"the queue did not finish in {timeout:.0f} s:\n{status}")
        time.sleep(2)


def _failed_logs(project: Path, status: str) -> str:
    """The end of `dvc queue logs` for each task the status table shows as failed: what went
    wrong, in the assertion message (the temporary workspace is gone by then)."""
    out = []
    for line in status.splitlines():
        if "Failed" in line and line.split():
            task = line.split()[0]
            res = subprocess.run(
                ["dvc", "queue", "logs", task],
                cwd=project,
                env=ENV,
                capture_output=True,
                text=True,
                timeout=60,
            )
            out.append(
                f"\n--- dvc queue logs {task} (last 60 lines):\n"
                + "\n".join((res.stdout + res.stderr).splitlines()[-60:])
            )
    return "".join(out)


@pytest.mark.slow
def test_queued_experiments_run_in_parallel_and_share_the_download_cache(
    reproduced: Path, served: MirrorServer, manifest: dict
) -> None:
    project = reproduced
    baseline_requests = Counter(served.requests)
    # the baseline fetched every metadata file and every image once
    assert baseline_requests and set(baseline_requests.values()) == {1}

    # a grid of 2: both change a download parameter, so each temporary workspace reruns download;
    # tracking on (the baseline ran without), so both create the project's store at once
    store = project / "mlflow.db"
    assert not store.exists()
    sh(
        "dvc",
        "exp",
        "run",
        "--queue",
        "train",
        "-S",
        "train.lr=0.01,0.003",
        "-S",
        "data.max_images_per_class=8",
        "-S",
        "tracking.enabled=true",
        cwd=project,
    )
    queued = sh("dvc", "queue", "status", cwd=project).stdout
    assert queued.count("Queued") == 2, queued
    t0 = time.monotonic()
    try:
        sh("dvc", "queue", "start", "-j", "2", cwd=project)
        status = wait_for_queue(project, timeout=300)
    finally:  # the workers leave after 10 s idle; stop them now (a no-op if they have)
        subprocess.run(
            ["dvc", "queue", "stop"], cwd=project, env=ENV, capture_output=True, timeout=60
        )
    print(f"2 queued experiments with -j 2: {time.monotonic() - t0:.0f} s")
    assert status.count("Success") == 2, status + _failed_logs(project, status)

    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=project).stdout)
    exps = [e for baseline in shown for e in (baseline.get("experiments") or [])]
    assert len(exps) == 2, shown
    lrs = set()
    for exp in exps:
        run = exp["revs"][0]
        data = run["data"]
        assert run["error"] is None, run
        params = data["params"]["params.yaml"]["data"]
        assert params["data"]["max_images_per_class"] == 8
        lrs.add(params["train"]["lr"])
        metrics = data["metrics"]
        # 8 per class, of which the mirror lacks 3 and serves 1 broken (the baseline's too)
        assert metrics["metrics/download.json"]["data"]["selected"] == 24
        assert metrics["metrics/download.json"]["data"]["downloaded"] == 20
        assert metrics["metrics/train.json"]["data"]["epochs_run"] == 1
    assert lrs == {0.01, 0.003}

    # Their MLflow runs outlived the temporary workspaces: they are in the project's store
    # (DVC_ROOT/mlflow.db), one per experiment, named after it, with its parameters and results.
    client = MlflowClient(f"sqlite:///{store}")
    exp = client.get_experiment_by_name("oi-pipeline")
    assert exp is not None, f"the queued experiments logged nothing to {store}"
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(e["name"] for e in exps), runs
    assert {float(r.data.params["train.lr"]) for r in runs} == lrs
    for r in runs:
        assert r.info.status == "FINISHED" and r.data.tags["dvc_exp_name"] == r.info.run_name
        assert r.data.metrics["train.epochs_run"] == 1 and "train.test_acc_pct" in r.data.metrics
    # the table a user reads: params and metrics side by side, one row per experiment
    table = sh("dvc", "exp", "show", "--no-pager", "--md", cwd=project).stdout
    assert "train.lr" in table and "test_acc_pct" in table

    # Both experiments read the project's cache (paths.cache resolved against DVC_ROOT): no
    # metadata file and no image the mirror has was fetched again. Only what the cache cannot
    # hold is asked for again, once by each experiment: the images the mirror lacks or serves
    # broken (which also shows that both ran `download` against the mirror).
    uncacheable = {
        f"open-images-dataset/{e['split']}/{e['id']}.jpg"
        for kind in ("missing", "not_jpeg")
        for e in manifest[kind]
    }
    again = Counter(served.requests) - baseline_requests
    assert set(again) <= uncacheable, sorted(set(again) - uncacheable)
    assert again and set(again.values()) == {2}, again


@pytest.mark.slow
def test_push_to_a_local_remote_then_clone_and_pull_restores_every_output(
    reproduced: Path, tmp_path: Path
) -> None:
    project = reproduced
    remote = tmp_path / "remote"
    sh("dvc", "remote", "add", "-d", "local", str(remote), cwd=project)
    sh("git", "commit", "-qam", "remote", cwd=project)
    # the stages reproduced so far and what they depend on (optimize and later never ran)
    pushed = sh("dvc", "push", "--with-deps", "export", cwd=project).stdout
    assert "pushed" in pushed, pushed

    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(project), str(clone), cwd=tmp_path)
    assert not (clone / "models").exists()
    sh("dvc", "pull", "--with-deps", "export", cwd=clone)
    status = sh("dvc", "status", "export", cwd=clone).stdout.strip()
    assert status == "Data and pipelines are up to date.", status
    expected = tree_hashes(project)
    assert {
        "models/model.pt",
        "artifacts/exported/model.onnx",
        "data/raw/labels.csv",
        "data/prepared/train.csv",
    } <= set(expected)
    assert tree_hashes(clone) == expected
