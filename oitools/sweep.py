"""Hydra multirun over the whole pipeline: one job = download -> ... -> report in its own folder.

    python -m oitools.sweep -m model=resnet18,mobilenet_v3_small train.recipe=linear_probe,full
    python -m oitools.sweep -m hydra/launcher=joblib hydra.launcher.n_jobs=2 model=a,b

This module is the orchestrator, like `dvc.yaml`: it calls the same `run(cfg)` functions DVC runs,
in the order `dvc.yaml` lists them (read by `oipipe.core.pipeline`), and is not a stage itself (no
stage imports it). Per job:

- `paths.root` is the job's folder (`hydra.sweep.dir`/`hydra.sweep.subdir`, conf/hydra/output/).
- `paths.cache`, `paths.raw` and `paths.prepared` point to `<sweep>/shared/data-<hash>/`, keyed by
  the data config: jobs with the same data share one download and one prepare. A file lock in
  that folder makes the first job do both while the others wait, then find `complete.json`.
- The benchmark and profile (the stages that time the machine) run under a file lock in the
  sweep folder, one job at a time, while the other jobs train, export and optimize: timings are
  not taken on cores another job is using. Each job records `benchmark_serialized: true` (and
  the time it waited) in `metrics/sweep.json` and as a tag of its MLflow run.
- A failing job appends its overrides and error to `<sweep>/sweep_failures.jsonl`, logs the
  traceback, and re-raises: Hydra's sweepers read every job's result only after the whole batch
  ran, so the other jobs finish and the sweep exits with 1.
- The return value is `sweep.objective` (conf/sweep: `<stage>.<key>` of `metrics/<stage>.json`,
  by default train's best validation accuracy), which `hydra/sweeper=optuna` optimises.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import hydra
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from oipipe.core.config import PROJECT_ROOT, path, validate
from oipipe.core.errors import ConfigError
from oipipe.core.files import file_lock, write_json, write_text
from oipipe.core.tracking import experiment_id, tracking_uri

log = logging.getLogger("oitools.sweep")

FAILURES = "sweep_failures.jsonl"
DATA_STAGES = ("download", "prepare")  # shared by every job of one data config
TIMED_STAGES = ("benchmark", "profile")  # they time the machine: one job at a time (a lock)


# --- the stage order: dvc.yaml's, read, not copied --------------------------------------------

_CMD = re.compile(r"^python -m (?P<module>[\w.]+)(?: --variant \$\{item\})?$")
_FOREACH = re.compile(r"^\$\{(?P<key>[\w.]+)\}$")


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # what `python -m` runs
    foreach: str | None  # the config list a foreach stage runs over, e.g. "optimize.variants"


def stage_order(dvc_yaml: Path = PROJECT_ROOT / "dvc.yaml") -> tuple[Stage, ...]:
    """The stages of `dvc_yaml` in the order written (DVC's own order runs dependencies first;
    the file lists them so, and `tests/test_stages_are_peers.py` holds that)."""
    stages = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))["stages"]
    out = []
    for name, body in stages.items():
        foreach = None
        if "foreach" in body:
            m = _FOREACH.match(str(body["foreach"]))
            if not m:
                raise ValueError(
                    f"{dvc_yaml}: stage {name}: foreach {body['foreach']!r} is not "
                    "a config list (${group.key})"
                )
            foreach, body = m["key"], body["do"]
        m = _CMD.match(body["cmd"])
        if not m:
            raise ValueError(
                f"{dvc_yaml}: stage {name}: cmd {body['cmd']!r} is not `python -m <module>`"
            )
        out.append(Stage(name, m["module"], foreach))
    return tuple(out)


def data_key(data: DictConfig) -> str:
    """What defines a job's downloaded and prepared data: its whole data config (how fast the
    data arrives is `runtime`'s, so jobs differing only there share one download)."""
    blob = OmegaConf.to_container(data, resolve=True)
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]


def job_config(
    cfg: DictConfig, job_dir: Path, sweep_dir: Path, launch_dir: Path, tags: dict[str, str]
) -> DictConfig:
    """The composed config with the sweep's paths and tags, validated like every stage's."""
    raw = cast(dict, OmegaConf.to_container(cfg, resolve=False))
    raw.pop("hydra", None)  # Hydra's own node, when a caller passes the full composed config
    cfg = OmegaConf.create(raw)  # a dict in, a DictConfig out
    # A relative photo folder is relative to the project root the config names (`paths.root`, as
    # seen from where the sweep started), not to the job's folder.
    folder = Path(cfg.data.folder)
    if not folder.is_absolute():
        cfg.data.folder = str((launch_dir / cfg.paths.root / folder).resolve())
    shared = sweep_dir / "shared" / f"data-{data_key(validate(cfg).data)}"
    cfg.paths.root = str(job_dir)
    for key in ("cache", "raw", "prepared"):
        cfg.paths[key] = str(shared / key)
    if cfg.tracking.enabled and not cfg.tracking.uri and not os.environ.get("MLFLOW_TRACKING_URI"):
        # One database for the whole sweep instead of one per job folder.
        cfg.tracking.uri = "sqlite:///" + str(sweep_dir / "mlflow.db")
    cfg.tracking.tags = {**(cfg.tracking.get("tags") or {}), **tags}
    return validate(cfg)


def ensure_experiment(cfg: DictConfig, sweep_dir: Path) -> None:
    """Create the sweep's MLflow database and experiment once, under a lock: parallel jobs that
    each found neither would race to create them, and the loser would fail."""
    if not cfg.tracking.enabled:
        return

    uri = tracking_uri(cfg)
    location = None
    if uri.startswith("sqlite:"):  # artifacts beside the database, not in a job folder
        location = (sweep_dir / "mlartifacts").resolve().as_uri()
    with file_lock(sweep_dir / ".mlflow.lock"):  # a server store has no file of its own to lock
        experiment_id(uri, cfg.tracking.experiment, location)  # as every stage creates it


def run_stage(stage: Stage, cfg: DictConfig, timings: dict[str, float]) -> None:
    """One stage of the order, each item of a foreach stage in turn."""
    run = importlib.import_module(stage.module).run
    items = list(OmegaConf.select(cfg, stage.foreach)) if stage.foreach else [None]
    for item in items:
        timed_stage(stage.name, run, cfg, *([] if item is None else [item]), timings=timings)


def shared_data(cfg: DictConfig, timings: dict[str, float]) -> bool:
    """Download and prepare into the shared data folder once; True when this job reused them.

    The first job of a data config holds the lock while it works; the others wait on it and then
    find `complete.json`. A job that failed half-way leaves no `complete.json`, so the next one
    tries again (the download cache keeps what was fetched).
    """
    shared = path(cfg, "prepared").parent
    done = shared / "complete.json"
    metrics = path(cfg, "metrics")
    with file_lock(shared / ".lock") as waited:
        timings["data_lock_wait_s"] = round(waited, 3)
        if done.is_file():
            for name in DATA_STAGES:  # the job's metrics folder is complete either way
                src = shared / "metrics" / f"{name}.json"
                if src.is_file():
                    metrics.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, metrics / f"{name}.json")
            log.info(
                "data: reusing %s (made by %s)", shared, json.loads(done.read_text()).get("job_dir")
            )
            return True
        for stage in (s for s in stage_order() if s.name in DATA_STAGES):
            run_stage(stage, cfg, timings)
            (shared / "metrics").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(
                metrics / f"{stage.name}.json", shared / "metrics" / f"{stage.name}.json"
            )
        write_json(
            done, {"job_dir": str(path(cfg, "root")), "data": OmegaConf.to_container(cfg.data)}
        )
        return False


def timed_stage(stage: str, fn: Any, cfg: DictConfig, *args: Any, timings: dict[str, float]) -> Any:
    log.info("sweep job: %s", stage if not args else f"{stage} {' '.join(map(str, args))}")
    started = time.perf_counter()
    out = fn(cfg, *args)
    name = stage if not args else f"{stage}.{args[0]}"
    timings[f"{name}_s"] = round(time.perf_counter() - started, 3)
    return out


def run_pipeline(cfg: DictConfig, sweep_dir: Path, record: dict[str, Any]) -> None:
    """Every stage in `dvc.yaml`'s order, data shared, the timed stages under the sweep's lock."""
    timings: dict[str, float] = record["seconds"]
    ensure_experiment(cfg, sweep_dir)
    record["data_reused"] = shared_data(cfg, timings)
    with contextlib.ExitStack() as lock:
        for stage in stage_order():
            if stage.name in DATA_STAGES:
                continue
            if stage.name in TIMED_STAGES and "benchmark_started" not in record:
                waited = lock.enter_context(file_lock(sweep_dir / ".benchmark.lock"))
                timings["benchmark_lock_wait_s"] = round(waited, 3)
                record["benchmark_started"] = time.time()  # wall clock: comparable across jobs
            elif (
                stage.name not in TIMED_STAGES
                and "benchmark_started" in record
                and "benchmark_ended" not in record
            ):
                record["benchmark_ended"] = time.time()  # before the next job may start
                lock.close()
            run_stage(stage, cfg, timings)
        if "benchmark_started" in record:  # the timed stages came last: still under the lock
            record.setdefault("benchmark_ended", time.time())


def objective(cfg: DictConfig) -> float | None:
    """`sweep.objective` (`<stage>.<key>`) read from the job's `metrics/<stage>.json`: what a
    sweeper (Optuna) optimises."""
    stage, _, key = cfg.sweep.objective.partition(".")
    metrics = json.loads((path(cfg, "metrics") / f"{stage}.json").read_text())
    value = OmegaConf.select(OmegaConf.create(metrics), key)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ValueError(
            f"sweep.objective={cfg.sweep.objective}: metrics/{stage}.json has no "
            f"number at {key!r} (found {value!r})"
        )
    return float(value)


def record_failure(sweep_dir: Path, entry: dict[str, Any]) -> None:
    line = json.dumps(entry) + "\n"
    with file_lock(sweep_dir / ".failures.lock"), open(sweep_dir / FAILURES, "a") as fh:
        fh.write(line)


def run_job(cfg: DictConfig) -> float | None:
    """One sweep job; Hydra calls it with the job's composed config."""
    hc = HydraConfig.get()
    launch_dir = Path(hc.runtime.cwd)
    job_dir = Path(hc.runtime.output_dir).resolve()
    # Without -m a single job runs in `hydra.run.dir`, which is then its own sweep folder.
    sweep_dir = job_dir if hc.mode == RunMode.RUN else (launch_dir / hc.sweep.dir).resolve()
    overrides = list(hc.overrides.task)
    # `++tracking.tags.sweep_name=lr-grid` names the sweep (what oitools.compare --sweep takes);
    # by default it is the sweep folder's name.
    name = str((cfg.tracking.get("tags") or {}).get("sweep_name") or sweep_dir.name)
    record: dict[str, Any] = {
        "sweep": name,
        "job": hc.job.num,
        "overrides": overrides,
        "job_dir": str(job_dir),
        "status": "failed",
        "benchmark_serialized": True,
        "seconds": {},
    }
    started = time.perf_counter()
    tags = {
        "sweep_name": name,
        "sweep_job": str(hc.job.num),
        "sweep_overrides": " ".join(overrides),
        "sweep_benchmark_serialized": "true",
    }
    try:
        job = job_config(cfg, job_dir, sweep_dir, launch_dir, tags)
        record["data_dir"] = str(path(job, "prepared").parent)
        write_text(job_dir / "job_config.yaml", OmegaConf.to_yaml(job))
        run_pipeline(job, sweep_dir, record)
        value = objective(job)
    except Exception as e:
        kind = "config" if isinstance(e, ConfigError) else type(e).__name__
        log.error(
            "sweep job %d (%s) failed: %s: %s\n%s",
            hc.job.num,
            " ".join(overrides),
            kind,
            e,
            traceback.format_exc(),
        )
        record_failure(
            sweep_dir,
            {
                "job": hc.job.num,
                "overrides": overrides,
                "job_dir": str(job_dir),
                "error": f"{kind}: {e}",
            },
        )
        record["error"] = f"{kind}: {e}"
        write_json(job_dir / "metrics" / "sweep.json", record)
        raise
    record["status"] = "ok"
    record["seconds"]["total_s"] = round(time.perf_counter() - started, 3)
    record["objective"] = {"key": job.sweep.objective, "value": value}
    write_json(path(job, "metrics") / "sweep.json", record)
    log.info(
        "sweep job %d done in %.1f s: %s",
        hc.job.num,
        record["seconds"]["total_s"],
        path(job, "reports"),
    )
    return value


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    return run_job(cfg)


if __name__ == "__main__":
    main()
