"""MLflow tracking: run names and tags, the experiment kind, the default store under DVC, and a
SQLite store that survives concurrent first use by real stage processes."""

from __future__ import annotations

import os
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import mlflow
import pytest
from conftest import stage_cmd, write_params
from mlflow.tracking import MlflowClient

from oipipe.core import tracking
from oipipe.core.config import PROJECT_ROOT, path
from oipipe.core.tracking import KEY_TAG, stage_run
from stages import download


@pytest.fixture(scope="module")
def new_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty SQLite store, created once: creating MLflow's schema takes about 7 s, so a test
    that does not test creation copies this file instead."""
    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    assert sorted(p.name for p in db.parent.iterdir()) == ["mlflow.db"]  # one file, no WAL
    return db


def runs_of(db: Path) -> tuple[MlflowClient, object, list]:
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("oi-pipeline")
    return client, exp, client.search_runs([exp.experiment_id])


def test_run_name_tags_and_experiment_kind(
    make_cfg, new_store: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    cfg = make_cfg(
        "tracking.enabled=true", "++tracking.tags.sweep_name=grid", "++tracking.tags.sweep_job=3"
    )
    path(cfg, "root").mkdir(parents=True)
    shutil.copy(new_store, path(cfg, "root") / "mlflow.db")  # the default store, empty
    for stage in ("download", "prepare"):  # two stages, one run; the second resumes it
        with stage_run(cfg, stage) as t:
            t.log_metrics({"acc_pct": 50.0, "flag": True, "name": "x"})  # numbers only
            if stage == "download":  # a child that carries the key, like a benchmark row
                parent = mlflow.active_run()
                mlflow.start_run(
                    nested=True,
                    experiment_id=parent.info.experiment_id,
                    tags={KEY_TAG: parent.data.tags[KEY_TAG]},
                )
                mlflow.end_run("KILLED")
    client, exp, runs = runs_of(path(cfg, "root") / "mlflow.db")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    (child,) = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert child.info.status == "KILLED"  # later stages resumed the parent, not the child
    (run,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    key = run.data.tags[KEY_TAG]
    assert run.info.run_name == f"{cfg.model.name}-{cfg.train.recipe}-{key[:8]}"
    assert run.data.tags["sweep_name"] == "grid" and run.data.tags["sweep_job"] == "3"
    assert run.data.tags["model.name"] == cfg.model.name
    assert run.data.tags["oi_pipeline_version"] == metadata.version("oi-pipeline")
    assert run.data.metrics == {"download.acc_pct": 50.0, "prepare.acc_pct": 50.0}

    monkeypatch.setenv("DVC_EXP_NAME", "bushy-lamb")  # a new key: a new run, named by DVC
    with stage_run(cfg, "download"):
        pass
    named = {r.info.run_name for r in runs_of(path(cfg, "root") / "mlflow.db")[2]}
    assert len(named) == 3
    assert "bushy-lamb" in named
    explicit = make_cfg("tracking.enabled=true", "tracking.run_name=mine")
    with stage_run(explicit, "download"):
        pass
    assert "mine" in {r.info.run_name for r in runs_of(path(cfg, "root") / "mlflow.db")[2]}


def test_one_parent_run_per_pipeline_execution_keyed_by_config(
    make_cfg, new_store: Path, tmp_path: Path, monkeypatch
) -> None:
    """Two configs (same root, same store, same commit) are two executions: two runs, each
    holding every stage of its own. The same config again is the same execution: its run
    resumed, not a third one."""
    for var in ("DVC_EXP_NAME", "MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    db = tmp_path / "mlflow.db"
    shutil.copy(new_store, db)
    store = ("tracking.enabled=true", f"tracking.uri=sqlite:///{db}")
    a = make_cfg(*store, "train.lr=0.01")
    b = make_cfg(*store, "train.lr=0.003")

    def execute(cfg) -> None:  # what `dvc repro` does: each stage in turn, each resuming the run
        for stage in ("download", "prepare"):
            with stage_run(cfg, stage) as t:
                t.log_metrics({"lr": cfg.train.lr})

    def parents() -> tuple[MlflowClient, dict[str, object], int]:
        client, _, runs = runs_of(db)
        top = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        return client, {r.data.tags[KEY_TAG]: r for r in top}, len(top)

    execute(a)
    execute(b)
    _, runs, n = parents()
    assert n == 2, f"{n} parent run(s) for two configs"
    assert set(runs) == {tracking.pipeline_key(a), tracking.pipeline_key(b)}
    for cfg in (a, b):  # each run holds both stages of its own config, none of the other's
        metrics = runs[tracking.pipeline_key(cfg)].data.metrics
        assert metrics == {"download.lr": cfg.train.lr, "prepare.lr": cfg.train.lr}

    execute(a)  # `dvc repro -f`: the same execution again
    client, runs, n = parents()
    assert n == 2, f"{n} parent runs after rerunning a config"
    history = client.get_metric_history(runs[tracking.pipeline_key(a)].info.run_id, "download.lr")
    assert len(history) == 2, "the rerun did not log into the config's run"


def test_default_store_follows_dvc_root(make_cfg, tmp_path: Path, monkeypatch) -> None:
    """In a queued experiment the stage's cwd is a temporary copy; DVC_ROOT is the project."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "project"))
    relative = make_cfg("paths.root=.")
    assert tracking.tracking_uri(relative) == f"sqlite:///{tmp_path / 'project' / 'mlflow.db'}"
    absolute = make_cfg()  # an absolute paths.root is kept
    assert tracking.tracking_uri(absolute) == f"sqlite:///{path(absolute, 'root') / 'mlflow.db'}"


def test_dataset_digest_changes_with_the_split(tmp_path: Path) -> None:
    for name, text in {
        "train.csv": "a\n1\n",
        "val.csv": "a\n2\n",
        "test.csv": "a\n3\n",
        "labels.txt": "Cat\n",
    }.items():
        (tmp_path / name).write_text(text)
    before = tracking.dataset_digest(tmp_path)
    assert tracking.dataset_digest(tmp_path) == before
    (tmp_path / "val.csv").write_text("a\n4\n")
    assert tracking.dataset_digest(tmp_path) != before


@pytest.mark.slow
def test_concurrent_stages_on_a_fresh_sqlite_store(make_cfg, mirror, tmp_path: Path) -> None:
    """4 real `prepare` processes at once on one new SQLite file, 3 times: all succeed, and the
    store holds their 4 runs (without the lock: "table _alembic_tmp_tags already exists")."""
    src = make_cfg(srv=mirror)
    download.run(src)
    jobs = 4
    for attempt in range(3):
        db = tmp_path / f"store{attempt}" / "mlflow.db"
        procs = []
        for j in range(jobs):
            root = tmp_path / f"a{attempt}" / f"job{j}"
            shutil.copytree(path(src, "raw"), root / src.paths.raw)
            cfg = make_cfg(
                f"paths.root={root}",
                "tracking.enabled=true",
                f"tracking.uri=sqlite:///{db}",
                srv=mirror,
            )
            params = write_params(cfg, root / "params.yaml")
            env = {
                k: v
                for k, v in os.environ.items()
                if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "DVC_EXP_NAME")
            }
            procs.append(
                subprocess.Popen(
                    stage_cmd("prepare", params),
                    cwd=PROJECT_ROOT,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        errors = [p.communicate(timeout=300)[1] for p in procs]
        for p, err in zip(procs, errors, strict=True):
            assert p.returncode == 0, f"attempt {attempt}:\n{err[-3000:]}"
        _, exp, runs = runs_of(db)
        assert len(runs) == jobs, f"attempt {attempt}: {len(runs)} runs"
        assert all(r.data.metrics["prepare.train.images"] == 24 for r in runs)
        assert all(r.info.status == "FINISHED" for r in runs)


@pytest.mark.parametrize(
    "verdict,code", [("pass", 1), ("undecided", 0), ("fail", -1), (None, None)]
)
def test_verdict_codes(verdict, code) -> None:
    assert tracking.verdict_code(verdict) == code
