"""MLflow tracking shared by all stages.

DVC runs each stage in its own process, yet the stages of one pipeline execution must log to one
MLflow run. There is no execution id that DVC hands every stage, so the run is found by a key
derived from what defines the execution: the whole resolved config (which includes the output
root), the code's git commit and `DVC_EXP_NAME` when `dvc exp run` sets it. The first stage to
start creates the run with that key as a tag; later stages (other processes, other machines
sharing a tracking server) find it with a tag search and resume it. `MLFLOW_RUN_ID`, when set,
names the run explicitly and wins.

A forced rerun with the same config and commit (`dvc repro -f`) therefore logs into the same run:
metric histories grow by one step, artifacts are replaced.
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
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from stages.config import PROJECT_ROOT, path

log = logging.getLogger("stages.tracking")

KEY_TAG = "pipeline_key"


def tracking_uri(cfg: DictConfig) -> str:
    """`MLFLOW_TRACKING_URI` > `tracking.uri` > SQLite file `mlflow.db` in `paths.root`."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if cfg.tracking.uri:
        return str(cfg.tracking.uri)
    return "sqlite:///" + str((path(cfg, "root") / "mlflow.db").resolve())


@functools.cache  # one `git` subprocess per process, not one per call
def git_commit(repo: Path = PROJECT_ROOT) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def pipeline_key(cfg: DictConfig) -> str:
    """Same config + same commit + same DVC experiment = same pipeline execution."""
    blob = json.dumps({
        "config": OmegaConf.to_container(cfg, resolve=True),
        "root": str(path(cfg, "root").resolve()),
        "commit": git_commit(),
        "dvc_exp": os.environ.get("DVC_EXP_NAME", ""),
    }, sort_keys=True)
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

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.enabled:
            import mlflow

            clean = {f"{self.stage}.{k}": float(v) for k, v in flatten(metrics).items()
                     if isinstance(v, int | float) and not isinstance(v, bool)}
            mlflow.log_metrics(clean, step=step)

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

        reqs = [f"torch=={torch.__version__.split('+')[0]}",
                f"torchvision=={torchvision.__version__.split('+')[0]}"]
        if type(model).__module__.startswith("timm"):
            import timm

            reqs.append(f"timm=={timm.__version__}")
        mlflow.pytorch.log_model(model, name="model", pip_requirements=reqs,
                                 signature=infer_signature(example.numpy(), out.numpy()),
                                 input_example=example.numpy())

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
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        location = None
        if uri.startswith("sqlite:") and not os.environ.get("MLFLOW_TRACKING_URI"):
            # Keep artifacts beside the database rather than in the caller's cwd.
            location = (path(cfg, "root") / "mlartifacts").resolve().as_uri()
        exp_id = client.create_experiment(cfg.tracking.experiment, artifact_location=location)
    else:
        exp_id = exp.experiment_id

    key = pipeline_key(cfg)
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        found = client.search_runs([exp_id], filter_string=f"tags.{KEY_TAG} = '{key}'",
                                   max_results=1, order_by=["attribute.start_time DESC"])
        run_id = found[0].info.run_id if found else None
    tags = {KEY_TAG: key, "git_commit": git_commit(), "host": socket.gethostname()}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    if system_metrics:
        # MLflow's default (a sample every 10 s) logs nothing for a stage shorter than that.
        mlflow.set_system_metrics_sampling_interval(2)
        mlflow.set_system_metrics_samples_before_logging(1)
    # An active run left by a caller (e.g. a sweep) would make start_run nest; end it explicitly.
    while mlflow.active_run() is not None:
        mlflow.end_run()
    with mlflow.start_run(run_id=run_id, experiment_id=None if run_id else exp_id,
                          run_name=None if run_id else cfg.tracking.run_name, tags=tags,
                          log_system_metrics=system_metrics) as run:
        log.info("MLflow: stage %s logs to run %s (%s)", stage, run.info.run_id, uri)
        yield StageRun(stage, run.info.run_id)
