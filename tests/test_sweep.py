"""`python -m oitools.sweep -m ...`: a Hydra multirun of the whole pipeline, in a subprocess.

One sweep covers the end-to-end promises, because each full job costs ~50 s on 2 cores: 3 jobs
(`train.recipe=linear_probe,full,bogus`) through `hydra/launcher=submitit_local`, so they run at the
same time: `bogus` fails validation, the other two run every stage and contend for the shared
data and the benchmark lock. The default (basic, sequential) launcher runs the same job code; the
README gives its timing and joblib's.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import mirror_overrides, serve_mlflow
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from oimirror import MirrorServer
from oipipe.core.config import CONF_DIR, PROJECT_ROOT, compose, path
from oipipe.core.errors import ConfigError
from oipipe.core.files import read_csv, write_json
from oitools import sweep as sweep_module
from stages import download, prepare

# test_pipeline.py's tiny settings, as command-line overrides.
TINY = [
    "data.image_size=48",
    "runtime.fetch.backoff=0.01",
    "runtime.fetch.retries=3",
    "runtime.fetch.timeout=5",
    "runtime.fetch.workers=4",
    "model=mobilenet_v3_small",
    "model.weights=none",
    "model.input_size=48",
    "train.epochs=1",
    "runtime.train_workers=0",
    "train.precision=fp32",
    "runtime.system_metrics=false",
    "runtime.log_model=false",
    "export.formats=[onnx]",
    "export.verify_batch_sizes=[1,2]",
    "optimize.variants=[onnxruntime_fp32]",
    "optimize.calibration_images=8",
    "benchmark.threads=1",
    "benchmark.presets.default.batch_sizes=[2]",
    "benchmark.presets.default.warmup_iters=1",
    "benchmark.presets.default.warmup_seconds=0",
    "benchmark.presets.default.min_iters=2",
    "benchmark.presets.default.min_seconds=0",
    "benchmark.presets.default.trials=2",
    "profile.modes=[eager]",
    "profile.batch_sizes=[2]",
    "profile.warmup=1",
    "profile.iterations=2",
]


@pytest.mark.parametrize(
    "option",
    sorted(f"hydra/{f.parent.name}={f.stem}" for f in (CONF_DIR / "hydra").glob("*/*.yaml")),
)
def test_hydra_options_compose_and_jobs_get_their_paths(
    option: str, tmp_path: Path, monkeypatch
) -> None:
    """Every conf/hydra option composes (with its plugin); a job's config, Hydra's node included,
    validates with its own root and the data folder its data config names."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfgs = [
            hydra_compose("config", [option, *extra], return_hydra_config=True)
            for extra in ([], ["data.image_size=64"], ["runtime.fetch.workers=2"])
        ]
    output = OmegaConf.to_container(cfgs[0].hydra, resolve=False)
    assert output["sweep"]["subdir"] == "job${hydra.job.num}" and not output["job"]["chdir"]
    jobs = [
        sweep_module.job_config(
            c, tmp_path / f"job{i}", tmp_path, PROJECT_ROOT, {"sweep_job": str(i)}
        )
        for i, c in enumerate(cfgs)
    ]
    assert Path(jobs[0].paths.root) == tmp_path / "job0"
    assert Path(jobs[0].data.folder) == PROJECT_ROOT / "photos"  # not under the job folder
    assert jobs[0].tracking.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert dict(jobs[1].tracking.tags) == {"sweep_job": "1"}
    data = [Path(j.paths.prepared).parent for j in jobs]
    assert data[0] != data[1] and data[0] == data[2]  # image size is data, fetch workers not
    assert data[0].parent == tmp_path / "shared" and Path(jobs[0].paths.cache).parent == data[0]


def test_jobs_at_the_same_time_download_and_prepare_a_data_config_once(
    tmp_path: Path, monkeypatch
) -> None:
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
    jobs = [
        sweep_module.job_config(
            compose(["tracking.enabled=false", f"train.lr={lr}"]),
            tmp_path / f"job{i}",
            tmp_path,
            PROJECT_ROOT,
            {},
        )
        for i, lr in enumerate((1e-3, 1e-2, 1e-1))
    ]
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
    return subprocess.run(
        [sys.executable, "-m", "oitools.sweep", "-m", f"hydra.sweep.dir={sweep_dir}", *overrides],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=540,
        env=env,
    )


@dataclass
class Sweep:
    root: Path
    db: Path
    out: subprocess.CompletedProcess
    requests: Counter  # what the mirror served, by path

    @property
    def logs(self) -> str:
        return (
            self.out.stdout
            + self.out.stderr
            + "".join(f.read_text(errors="replace") for f in self.root.rglob("*.log"))
        )


@pytest.fixture(scope="module")
def parallel_sweep(tmp_path_factory: pytest.TempPathFactory, mirror_dir: Path) -> Sweep:
    """3 jobs at once through submitit_local on one fresh MLflow store: 2 finish, 1 fails."""
    tmp = tmp_path_factory.mktemp("parallel-sweep")
    root, db = tmp / "sweep", tmp / "mlflow.db"
    with MirrorServer(mirror_dir) as srv:
        out = sweep(
            root,
            "hydra/launcher=submitit_local",
            *mirror_overrides(srv),
            *TINY,
            f"tracking.uri=sqlite:///{db}",
            "train.recipe=linear_probe,full,bogus",
        )
        return Sweep(root, db, out, Counter(srv.requests))


@pytest.mark.slow
def test_parallel_sweep_shares_data_serialises_benchmarks_and_reports_failures(
    parallel_sweep: Sweep,
) -> None:
    root, db, out, logs = (
        parallel_sweep.root,
        parallel_sweep.db,
        parallel_sweep.out,
        parallel_sweep.logs,
    )
    assert out.returncode == 1, logs  # a job failed: the sweep says so

    # the failure: its overrides and error in one line; its folder holds no report
    failures = [
        json.loads(line) for line in (root / "sweep_failures.jsonl").read_text().splitlines()
    ]
    assert [f["job"] for f in failures] == [2], failures
    assert "train.recipe=bogus" in failures[0]["overrides"]
    assert "invalid value 'bogus' for 'train.recipe'" in failures[0]["error"]
    assert not (root / "job2" / "reports").exists()
    assert json.loads((root / "job2" / "metrics" / "sweep.json").read_text())["status"] == "failed"
    assert "invalid value 'bogus' for 'train.recipe'" in logs

    # the two others ran every stage, each in its own folder
    jobs = {}
    for num, mode in ((0, "linear_probe"), (1, "full")):
        job = root / f"job{num}"
        assert (job / "reports" / "REPORT.md").is_file(), logs
        record = json.loads((job / "metrics" / "sweep.json").read_text())
        assert record["status"] == "ok" and record["job"] == num
        assert f"train.recipe={mode}" in record["overrides"]
        assert yaml.safe_load((job / "job_config.yaml").read_text())["train"]["recipe"] == mode
        assert f"train.recipe={mode}" in (job / ".hydra" / "overrides.yaml").read_text()
        assert json.loads((job / "metrics" / "benchmark.json").read_text())["rows"]
        assert (job / "metrics" / "profile.json").is_file() and "profile_s" in record["seconds"]
        assert record["benchmark_serialized"] is True
        jobs[num] = record

    # one shared data folder, downloaded by one job and reused by the other: each file once (the
    # lock that makes it so when both arrive at once: test_jobs_at_the_same_time_...)
    shared = list((root / "shared").iterdir())
    assert len(shared) == 1 and jobs[0]["data_dir"] == jobs[1]["data_dir"] == str(shared[0])
    assert sorted(r["data_reused"] for r in jobs.values()) == [False, True]
    assert not (root / "job0" / "data").exists() and not (root / "job1" / "data").exists()
    requests = parallel_sweep.requests
    images = [p for p in requests if p.endswith(".jpg")]
    assert len(images) >= len(read_csv(shared[0] / "raw" / "labels.csv")) > 0
    assert max(requests.values()) == 1, requests.most_common(3)
    for job in ("job0", "job1"):  # the job that reused the data still has the data metrics
        assert (root / job / "metrics" / "download.json").is_file()

    # the benchmarks took turns
    first, second = sorted(jobs.values(), key=lambda r: r["benchmark_started"])
    assert first["benchmark_ended"] <= second["benchmark_started"]

    # each job's MLflow parent run carries the sweep, its number and its overrides
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("oi-pipeline")
    parents = [
        r
        for r in client.search_runs([exp.experiment_id])
        if "mlflow.parentRunId" not in r.data.tags
    ]
    tags = {r.data.tags.get("sweep_job"): r.data.tags for r in parents}
    assert set(tags) == {"0", "1"}, tags
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # as the stages make it
    for num, mode in ((0, "linear_probe"), (1, "full")):
        assert tags[str(num)]["sweep_name"] == "sweep"
        assert f"train.recipe={mode}" in tags[str(num)]["sweep_overrides"]
        assert tags[str(num)]["sweep_benchmark_serialized"] == "true"


def test_the_default_launcher_runs_on_after_a_failing_job(tmp_path: Path) -> None:
    """One after another in one process: job 0 fails, job 1 still runs (and fails its own way)."""
    root = tmp_path / "sweep"
    out = sweep(root, "tracking.enabled=false", "train.recipe=bogus,also_bogus")
    assert out.returncode == 1, out.stdout + out.stderr
    failures = [
        json.loads(line) for line in (root / "sweep_failures.jsonl").read_text().splitlines()
    ]
    assert [(f["job"], f["overrides"][-1]) for f in failures] == [
        (0, "train.recipe=bogus"),
        (1, "train.recipe=also_bogus"),
    ]
    assert "invalid value 'also_bogus' for 'train.recipe'" in failures[1]["error"]


# --- The MLflow UI, looked at in a real browser --------------------------------------------------

CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")
# What a root process in a sandbox with no internet needs: no sandboxing of its own, no GPU, and no
# background connections to Google (refused here, many at a time).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def js_number(x: float) -> str:
    """How a browser prints a float (the shortest repr, as Python's, without a trailing .0)."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def mlflow_format_metric(x: float) -> str:
    """How MLflow's compare view prints a metric (its `Utils.formatMetric`): 3 decimals below
    10, 2 below 100, else 1 (33.333 -> 33.33, 5187.989 -> 5188)."""
    if x == 0:
        return "0"
    if abs(x) < 1e-3:
        raise ValueError(f"{x}: exponent form, not needed here")
    decimals = 3 if abs(x) < 10 else 2 if abs(x) < 100 else 1
    return js_number(math.floor(x * 10**decimals + 0.5) / 10**decimals)  # JS Math.round


def add_column(page, metric: str) -> None:
    """Columns -> search the metric -> tick it, as a person adds a metric to the runs table."""
    dialog = page.get_by_role("dialog", name="Popover content")
    if not dialog.is_visible():
        page.get_by_role("button", name="Columns", exact=True).click()
    dialog.get_by_placeholder("Search columns").fill(metric)
    closed = dialog.locator(".du-bois-light-tree-treenode", has_text="Metrics (").locator(
        ".du-bois-light-tree-switcher_close"
    )
    if closed.count():
        closed.click()
    dialog.locator(".du-bois-light-tree-title").filter(
        has_text=re.compile(f"^{re.escape(metric)}$")
    ).click()


def compare_row(page, metric: str) -> list[str]:
    """The values of one metric in the compare view's metrics table, one per run, in the order
    of the address's runs. The table is virtualised: names and values are two grids, each
    rendering only the rows near its view, the names grid following the values grid's scroll one
    scroll event late (MLflow 3.17.2); so the values grid is scrolled down step by step, each step
    nudged by a pixel so that the names catch up. A row's `top` is its place in the whole table,
    the same in both grids."""
    name = page.get_by_role("link", name=metric, exact=True)
    names = page.locator(".ReactVirtualized__Grid", has=page.get_by_title("Plot chart")).first
    values = names.locator("xpath=following::div[@class='ReactVirtualized__Grid'][1]")
    values.scroll_into_view_if_needed()

    def scroll(y: int) -> None:
        for nudge in (0, 1):
            values.evaluate("(e, y) => { e.scrollTop = y; }", y + nudge)
            page.wait_for_timeout(100)

    for y in range(0, values.evaluate("e => e.scrollHeight"), 200):
        scroll(y)
        if name.count():
            top = name.evaluate("a => a.parentElement.style.top")
            cells = values.locator(f"xpath=.//div[contains(@style, 'top: {top};')]")
            if cells.count():
                scroll(max(0, int(float(top.removesuffix("px"))) - 90))  # the row in view
                return cells.all_inner_texts()
    raise AssertionError(f"{metric} is not in the compare view's metrics table")


def close_assistant(page) -> None:
    """MLflow 3.17 opens its chat assistant beside every page, over a third of the width."""
    close = page.locator("[data-component-id='mlflow.assistant.chat_panel.close']")
    if close.count() and close.is_visible():
        close.click()


@pytest.mark.slow
@pytest.mark.browser
def test_mlflow_ui_shows_each_jobs_accuracy_and_throughput(
    parallel_sweep: Sweep, tmp_path: Path
) -> None:
    """`mlflow server` on the finished sweep's store, read in headless Chromium: the experiment's
    runs table (with the two metric columns added through its column picker) and the compare view
    of the two jobs show each job's test accuracy and best throughput; screenshots are kept."""
    if not CHROMIUM.exists():
        if os.environ.get("OI_REQUIRE_BROWSER"):
            pytest.fail(f"no Chromium at {CHROMIUM}: `apt-get install chromium` (.ci/run does)")
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    client = MlflowClient(f"sqlite:///{parallel_sweep.db}")
    exp = client.get_experiment_by_name("oi-pipeline")
    jobs = sorted(
        (
            r
            for r in client.search_runs([exp.experiment_id])
            if "mlflow.parentRunId" not in r.data.tags
        ),
        key=lambda r: r.data.tags["sweep_job"],
    )
    assert [r.data.tags["sweep_job"] for r in jobs] == ["0", "1"], parallel_sweep.logs
    metrics = ("benchmark.best_throughput", "train.test_acc_pct")
    want = {r.info.run_name: [r.data.metrics[m] for m in metrics] for r in jobs}
    assert all(values[0] > 0 for values in want.values()), want  # a measured throughput
    shots = tmp_path / "screenshots"
    shots.mkdir()
    ml = "workflowType=machine_learning"  # else MLflow 3.17 shows its GenAI view (README)

    with serve_mlflow(parallel_sweep.db, tmp_path / "server.log") as base, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 2000, "height": 900})
            page.set_default_timeout(60_000)

            # the experiment page: both jobs listed, under their run names
            page.goto(f"{base}/#/experiments/{exp.experiment_id}?{ml}")
            for name in want:
                page.get_by_text(name, exact=True).wait_for()
            assert page.get_by_role("button", name="Model training").is_visible()
            close_assistant(page)
            for metric in metrics:
                add_column(page, metric)
            page.keyboard.press("Escape")
            for metric in metrics:
                page.get_by_role("columnheader", name=metric, exact=True).first.wait_for()
            page.screenshot(path=shots / "experiment_runs.png")
            # each row (ag-grid splits it into a pinned and a scrolling part: one row-index)
            for i in range(len(want)):
                row = " | ".join(page.locator(f"[role=row][row-index='{i}']").all_inner_texts())
                name = next((n for n in want if n in row), None)
                assert name, row
                cells = row.replace(" | ", "\n").split("\n")
                for value in want[name]:
                    assert js_number(value) in cells, (name, value, row)

            # the compare view of the two jobs: the same numbers side by side
            ids = json.dumps([r.info.run_id for r in jobs])
            page.goto(
                f"{base}/#/compare-runs?runs={ids}&experiments="
                f"{json.dumps([exp.experiment_id])}&{ml}"
            )
            page.get_by_text(f"Comparing {len(jobs)} Runs").wait_for()
            for name in want:
                page.get_by_text(name, exact=True).first.wait_for()
            close_assistant(page)
            for k, metric in enumerate(metrics):
                shown = compare_row(page, metric)
                assert shown == [mlflow_format_metric(v[k]) for v in want.values()], (
                    metric,
                    shown,
                    want,
                )
            # the metrics table, scrolled to the last metric read (test accuracy)
            page.screenshot(path=shots / "compare_jobs.png")
        finally:
            browser.close()
    print(f"screenshots: {shots}")
    assert all(
        (shots / f).stat().st_size > 10_000 for f in ("experiment_runs.png", "compare_jobs.png")
    )


def test_the_stage_order_is_dvc_yamls_and_each_stage_follows_what_it_reads() -> None:
    """The sweep reads the order from dvc.yaml; that order must run producers first."""
    order = sweep_module.stage_order()
    dvc = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]
    assert [s.name for s in order] == list(dvc)
    assert {s.module for s in order} == {
        f"stages.{p.stem}" for p in (PROJECT_ROOT / "stages").glob("*.py") if p.stem != "__init__"
    }
    assert [s.foreach for s in order if s.foreach] == ["optimize.variants"]

    def entries(body: dict, key: str) -> list[str]:
        body = body.get("do", body)
        return [e if isinstance(e, str) else next(iter(e)) for e in body.get(key, [])]

    made_by = {
        out.replace("/${item}", ""): name
        for name, body in dvc.items()
        for out in entries(body, "outs")
    }
    position = {s.name: i for i, s in enumerate(order)}
    checked = 0
    for name, body in dvc.items():
        for dep in entries(body, "deps"):
            producer = next((p for out, p in made_by.items() if dep.startswith(out)), None)
            if producer is not None and producer != name:
                assert position[producer] < position[name], (name, dep, producer)
                checked += 1
    assert checked >= 10, "the stages read each other's outputs: the check must have run"


def test_the_objective_is_the_configured_metric(tmp_path: Path) -> None:
    cfg = compose([f"paths.root={tmp_path}"])
    assert cfg.sweep.objective == "train.best_val_acc_pct"
    write_json(path(cfg, "metrics") / "train.json", {"best_val_acc_pct": 75.0, "nested": {"x": 3}})
    assert sweep_module.objective(cfg) == 75.0
    assert (
        sweep_module.objective(
            compose([f"paths.root={tmp_path}", "sweep.objective=train.nested.x"])
        )
        == 3.0
    )
    with pytest.raises(ValueError, match="metrics/train.json has no number at 'nested'"):
        sweep_module.objective(compose([f"paths.root={tmp_path}", "sweep.objective=train.nested"]))
    with pytest.raises(ConfigError, match="sweep.objective"):
        compose(["sweep.objective=nodot"])
