"""MLflow tracking shared by all stages (what the runs show, for users: README, Tracking).

DVC runs each stage in its own process, yet the stages of one pipeline execution must log to one
MLflow run, and DVC hands the stages no execution id. So the run is found by a key derived from
what defines the execution: the whole resolved config (output root included), the code's git
commit and `DVC_EXP_NAME`. The first stage creates the run with the key as a tag; later stages
(other processes, other machines sharing a server) find it by tag and resume it;
`MLFLOW_RUN_ID` wins when set. A forced rerun of the same config and commit therefore logs into
the same run (histories grow by one step, artifacts are replaced).

Why the rules below are what they are:

- One unit per kind of figure, named: every accuracy, agreement and share is a percentage whose
  key ends in `_pct`, in the JSON and CSV files and in MLflow alike, so a metric is logged as the
  file holds it and a reader never guesses the unit.
- Verdicts are tags and also `verdict_code` metrics (`VERDICT_CODES`), so that they can be
  charted and filtered numerically.
- A SQLite store is created and migrated once, under an exclusive lock on `<db file>.lock`:
  MLflow's own migration is not safe against concurrent first use (4 `prepare` processes on a
  fresh file all failed with "table _alembic_tmp_tags already exists" and left it unreadable).
- The default store is `<DVC_ROOT>/<paths.root>/mlflow.db`: in a queued experiment DVC runs the
  stage in a temporary copy under `.dvc/tmp/exps/` but sets `DVC_ROOT` to the *original*
  project's root (dvc/repo/experiments/queue/base.py), so queued runs land in the project's
  store rather than in a copy deleted after the run.
- The experiment is tagged `mlflow.experimentKind = custom_model_development`, its kind in
  MLflow's own terms (MLflow 3.17's UI picks its view from its own switch or
  `?workflowType=machine_learning`, not from the tag).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import socket
import subprocess
import warnings
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from oipipe.core.config import PROJECT_ROOT, path
from oipipe.core.files import file_lock
from oipipe.core.version import project_version

log = logging.getLogger("oipipe.core.tracking")

KEY_TAG = "pipeline_key"
DVC_EXP_TAG = "dvc_exp_name"
VERSION_TAG = "oi_pipeline_version"  # oipipe.core.version: the code that logged the run
# A verdict as a number, so runs can be sorted, charted and filtered by it: pass above undecided
# above fail. The verdict itself is also a tag.
VERDICT_CODES = {"pass": 1, "undecided": 0, "fail": -1}
# Without this tag MLflow 3's UI opens a new experiment in its GenAI (traces) view.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def verdict_code(verdict: str | None) -> int | None:
    return VERDICT_CODES.get(verdict) if verdict else None


def default_store_root(cfg: DictConfig) -> Path:
    """`paths.root`, resolved against `DVC_ROOT` (the project, also from a queued experiment's
    temporary copy) when DVC runs the stage; an absolute `paths.root` is kept."""
    return (Path(os.environ.get("DVC_ROOT", "")) / path(cfg, "root")).resolve()


def tracking_uri(cfg: DictConfig) -> str:
    """`MLFLOW_TRACKING_URI` > `tracking.uri` > SQLite file `mlflow.db` in `paths.root`."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if cfg.tracking.uri:
        return str(cfg.tracking.uri)
    return "sqlite:///" + str(default_store_root(cfg) / "mlflow.db")


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI, None for any other store (server, in memory)."""
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return None
    return Path(uri[len("sqlite:///") :].split("?", 1)[0])


def experiment_id(uri: str, name: str, artifact_location: str | None) -> str:
    """The experiment's id, creating the store (SQLite: under a file lock) and the experiment.

    The lock serialises MLflow's schema creation/migration and the experiment's creation among
    all processes that share the file; later processes wait, then find both ready."""
    db = sqlite_file(uri)
    if db is None:
        return _experiment_id(uri, name, artifact_location)
    with file_lock(Path(f"{db}.lock")):
        return _experiment_id(uri, name, artifact_location)


def _experiment_id(uri: str, name: str, artifact_location: str | None) -> str:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)  # the first call on a new SQLite file creates its schema
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            exp_id = client.create_experiment(
                name, artifact_location=artifact_location, tags=EXPERIMENT_KIND
            )
        except MlflowException:  # created meanwhile by a job on the same server
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            exp_id = exp.experiment_id
    else:
        exp_id = exp.experiment_id
    if exp is not None and exp.tags.get("mlflow.experimentKind") is None:
        for k, v in EXPERIMENT_KIND.items():  # an experiment this project did not create
            client.set_experiment_tag(exp_id, k, v)
    return exp_id


def run_name(cfg: DictConfig, key: str) -> str:
    """`tracking.run_name` > `DVC_EXP_NAME` > `<model.name>-<train.recipe>-<short key>`."""
    return (
        cfg.tracking.run_name
        or os.environ.get("DVC_EXP_NAME")
        or f"{cfg.model.name}-{cfg.train.recipe}-{key[:8]}"
    )


def dataset_digest(prepared: Path, splits: Collection[str] = ("train", "val", "test")) -> str:
    """A hash of the split CSVs and the class index: the same data, the same digest."""
    h = hashlib.sha256()
    for name in [*(f"{s}.csv" for s in splits), "labels.txt"]:
        f = prepared / name
        h.update(name.encode() + b"\0" + (f.read_bytes() if f.is_file() else b"") + b"\0")
    return h.hexdigest()[:16]


@functools.cache  # one `git` subprocess per process, not one per call
def git_commit(repo: Path = PROJECT_ROOT) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def pipeline_key(cfg: DictConfig) -> str:
    """Same config + same commit + same DVC experiment = same pipeline execution."""
    blob = json.dumps(
        {
            "config": OmegaConf.to_container(cfg, resolve=True),
            "root": str(path(cfg, "root").resolve()),
            "commit": git_commit(),
            "dvc_exp": os.environ.get("DVC_EXP_NAME", ""),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class StageRun:
    """What a stage logs through; every method does nothing when tracking is disabled."""

    def __init__(self, stage: str, run_id: str | None):
        self.stage = stage
        self.run_id = run_id

    @property
    def enabled(self) -> bool:
        return self.run_id is not None

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self.enabled:
            import mlflow

            # MLflow params are strings of at most 6000 characters; lists become their repr.
            mlflow.log_params({k: str(v)[:6000] for k, v in flatten(params).items()})

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Numbers only (nested mappings flattened to dotted keys; other values, None and bools
        left out), prefixed with the stage, as the stage's files hold them."""
        if self.enabled:
            import mlflow

            clean = {
                f"{self.stage}.{k}": float(v)
                for k, v in flatten(metrics).items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
            mlflow.log_metrics(clean, step=step)

    def log_dataset(self, cfg: DictConfig) -> None:
        """The prepared data as the run's dataset input (the runs table's Dataset column):
        name = data source and classes, digest = `dataset_digest`, source = the folder."""
        if not self.enabled:
            return
        import mlflow
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        prepared = path(cfg, "prepared").resolve()
        labels = prepared / "labels.txt"
        classes = labels.read_text(encoding="utf-8").split("\n") if labels.is_file() else []
        name = f"{cfg.data.source}: {', '.join(c for c in classes if c)}"
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": all local
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(str(prepared))
        # 500: the length of MLflow's dataset name column
        mlflow.log_input(
            # MetaDataset leaves `profile` abstract in its type; MLflow instantiates it itself
            MetaDataset(source, name=name[:500], digest=dataset_digest(prepared)),  # type: ignore[abstract]
            context="training",
        )

    def log_artifact(self, file: Path) -> None:
        if self.enabled:
            import mlflow

            mlflow.log_artifact(str(file), artifact_path=self.stage)

    def log_model(self, model: Any, example: Any) -> None:
        """`mlflow.pytorch.log_model` with a signature and input example from `example`."""
        if not self.enabled:
            return
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        with torch.no_grad():
            out = model(example)
        # Explicit requirements: inferring them imports and inspects the whole environment
        # (tens of seconds) and would pin every package of this project's dev install.
        import torchvision

        reqs = [
            f"torch=={torch.__version__.split('+')[0]}",
            f"torchvision=={torchvision.__version__.split('+')[0]}",
        ]
        if type(model).__module__.startswith("timm"):
            import timm

            reqs.append(f"timm=={timm.__version__}")
        mlflow.pytorch.log_model(
            model,
            name="model",
            pip_requirements=reqs,
            signature=infer_signature(example.numpy(), out.numpy()),
            input_example=example.numpy(),
        )

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.enabled:
            import mlflow

            mlflow.set_tags(dict(tags))


@contextlib.contextmanager
def stage_run(cfg: DictConfig, stage: str, system_metrics: bool = False) -> Iterator[StageRun]:
    """Resume (or create) the pipeline's MLflow run for the duration of one stage.

    `system_metrics` samples CPU, memory (and GPU) use into the run while the stage works.
    """
    if not cfg.tracking.enabled:
        yield StageRun(stage, None)
        return
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    exported = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if exported is None:
        # MLflow 3 also exports the URI to the environment; left there it would outrank the
        # config of every later stage in this process (tests, sweeps) and leak into subprocesses
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    location = None
    if uri.startswith("sqlite:") and not os.environ.get("MLFLOW_TRACKING_URI"):
        # Keep artifacts beside the database rather than in the caller's cwd.
        location = (default_store_root(cfg) / "mlartifacts").as_uri()
    exp_id = experiment_id(uri, cfg.tracking.experiment, location)
    client = MlflowClient(uri)  # only now: a client opens (and migrates) the store at once

    key = pipeline_key(cfg)
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        # the benchmark's child runs carry the key too; the pipeline run is the one without
        # a parent
        found = [
            r
            for r in client.search_runs(
                [exp_id],
                filter_string=f"tags.{KEY_TAG} = '{key}'",
                max_results=1000,
                order_by=["attribute.start_time DESC"],
            )
            if "mlflow.parentRunId" not in r.data.tags
        ]
        run_id = found[0].info.run_id if found else None
    tags = {
        **{str(k): str(v) for k, v in cfg.tracking.tags.items()},
        KEY_TAG: key,
        "git_commit": git_commit(),
        VERSION_TAG: project_version(),
        "host": socket.gethostname(),
        "model.name": str(cfg.model.name),
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags[DVC_EXP_TAG] = os.environ["DVC_EXP_NAME"]
    if system_metrics:
        # MLflow's default (a sample every 10 s) logs nothing for a stage shorter than that.
        mlflow.set_system_metrics_sampling_interval(2)
        mlflow.set_system_metrics_samples_before_logging(1)
    # An active run left by a caller (e.g. a sweep) would make start_run nest; end it explicitly.
    while mlflow.active_run() is not None:
        mlflow.end_run()
    with mlflow.start_run(
        run_id=run_id,
        experiment_id=None if run_id else exp_id,
        run_name=None if run_id else run_name(cfg, key),
        tags=tags,
        log_system_metrics=system_metrics,
    ) as run:
        log.info("MLflow: stage %s logs to run %s (%s)", stage, run.info.run_id, uri)
        yield StageRun(stage, run.info.run_id)
