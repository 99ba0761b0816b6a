"""`python -m oitools.compare`: one comparison across the MLflow runs of a sweep.

The store is a real MLflow SQLite store under tmp_path, filled with runs in the shapes the stages
log (a parent per job with the sweep tags, `model.name` and `train.*` metrics; a nested child per
variant and batch size with the benchmark's params, metrics and tags), plus runs that must not
appear.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import write_params

from oipipe.core.config import compose
from oipipe.core.errors import InputError
from oipipe.measure import pareto
from oitools import compare

SWEEP = "models"
EXPERIMENT = "oi-pipeline"


def _child(
    variant: str,
    batch: int,
    throughput: float | None,
    top1: float | None,
    verdict: str | None,
    status: str = "ok",
    backend: str = "onnxruntime",
    precision: str = "int8",
) -> dict:
    return {
        "variant": variant,
        "batch": batch,
        "throughput": throughput,
        "top1_pct": top1,
        "verdict": verdict,
        "status": status,
        "backend": backend,
        "precision": precision,
    }


# Job 0 was logged before metric names carried their unit (`train.test_acc`, `top1`, in percent
# as the later unsuffixed runs were); job 1 with the `_pct` names.
JOBS = [
    {
        "job": "0",
        "overrides": "model=resnet18",
        "model": "resnet18",
        "legacy": True,
        "train": {
            "test_acc": 90.0,
            "test_acc_ci_low": 82.56,
            "test_acc_ci_high": 94.48,
            "test_images": 100,
        },
        "children": [
            _child("eager_fp32", 32, 100.0, 90.0, "pass", backend="torch_eager", precision="fp32"),
            # the fastest of all, outside its accuracy bar: never shipped
            _child("inductor_int8", 32, 900.0, 70.0, "fail", backend="torchao"),
            _child("onnxruntime_int8", 32, 600.0, 88.0, "undecided"),
            _child(
                "trt_fp16",
                32,
                None,
                None,
                None,
                status="skipped",
                backend="torch_tensorrt",
                precision="fp16",
            ),
            _child("eager_fp32", 1, 40.0, 90.0, "pass", backend="torch_eager", precision="fp32"),
            _child("inductor_int8", 1, 120.0, 70.0, "fail", backend="torchao"),
            _child("onnxruntime_int8", 1, 80.0, 88.0, "undecided"),
        ],
    },
    {
        "job": "1",
        "overrides": "model=mobilenet_v3_small",
        "model": "mobilenet_v3_small",
        "train": {
            "test_acc_pct": 85.0,
            "test_acc_ci_low_pct": 76.7,
            "test_acc_ci_high_pct": 90.7,
            "test_images": 100,
        },
        "children": [
            _child("eager_fp32", 32, 300.0, 85.0, "pass", backend="torch_eager", precision="fp32"),
            _child("inductor_fp32", 32, 500.0, 89.0, "pass", backend="inductor", precision="fp32"),
            _child("eager_fp32", 1, 90.0, 85.0, "pass", backend="torch_eager", precision="fp32"),
            _child("inductor_fp32", 1, 150.0, 89.0, "pass", backend="inductor", precision="fp32"),
        ],
    },
]
# Another sweep's job, faster than anything above and passing: it must not appear.
OTHER = {
    "job": "0",
    "overrides": "model=resnet50",
    "model": "resnet50",
    "train": {
        "test_acc_pct": 95.0,
        "test_acc_ci_low_pct": 88.8,
        "test_acc_ci_high_pct": 97.8,
        "test_images": 100,
    },
    "children": [
        _child("trt_fp16", 32, 5000.0, 95.0, "pass", backend="torch_tensorrt", precision="fp16")
    ],
}


def log_job(client, exp_id: str, job: dict, sweep: str) -> str:
    """A parent run as the pipeline's stages leave it, and its benchmark rows as nested runs."""
    from mlflow.entities import Metric, Param

    base = {c["batch"]: c["throughput"] for c in job["children"] if c["variant"] == "eager_fp32"}
    parent = client.create_run(
        exp_id,
        run_name=f"{sweep}-{job['job']}",
        tags={
            "pipeline_key": f"key-{sweep}-{job['job']}",
            "sweep_name": sweep,
            "sweep_job": job["job"],
            "sweep_overrides": job["overrides"],
            "machine.cpu": "Test CPU",
        },
    ).info.run_id
    client.log_batch(
        parent,
        params=[Param("model.name", job["model"])],
        metrics=[Metric(f"train.{k}", float(v), 0, 0) for k, v in job["train"].items()],
    )
    client.set_terminated(parent)
    for c in job["children"]:
        key = f"{c['variant']}@b{c['batch']}"
        tags = {"mlflow.parentRunId": parent, "benchmark.row": key, "status": c["status"]}
        if c["verdict"]:
            tags["verdict"] = c["verdict"]
        child = client.create_run(exp_id, run_name=key, tags=tags).info.run_id
        metrics = {}
        if c["status"] == "ok":
            top1 = c["top1_pct"]
            unit = "" if job.get("legacy") else "_pct"
            metrics = {
                "throughput": c["throughput"],
                "latency_p99_ms": 1000 * c["batch"] / c["throughput"] * 1.2,
                "speedup": c["throughput"] / base[c["batch"]] if c["batch"] in base else None,
                f"top1{unit}": top1,
                f"top1_ci_low{unit}": top1 - 5,
                f"top1_ci_high{unit}": top1 + 4,
                "eval_images": 200,
                "size_mb": 12.5,
            }
        client.log_batch(
            child,
            params=[
                Param(k, str(v))
                for k, v in (
                    ("variant", c["variant"]),
                    ("backend", c["backend"]),
                    ("precision", c["precision"]),
                    ("batch_size", c["batch"]),
                )
            ],
            metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items() if v is not None],
        )
        client.set_terminated(child)
    return parent


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    uri = f"sqlite:///{db}"
    client = MlflowClient(uri)
    exp = client.create_experiment(EXPERIMENT, artifact_location=db.parent.as_uri())
    for job in JOBS:
        log_job(client, exp, job, SWEEP)
    log_job(client, exp, OTHER, "other")
    lone = client.create_run(exp, run_name="not-a-sweep").info.run_id  # no sweep tags at all
    client.set_terminated(lone)
    return uri


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("root")
    return compose([f"paths.root={root}", "tracking.enabled=false"])


@pytest.fixture(scope="module")
def result(cfg, store, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return compare.run(cfg, sweep=SWEEP, uri=store, out=tmp_path_factory.mktemp("compare"))


def md_tables(md: str) -> dict[str, list[dict[str, str]]]:
    """Each `## heading`'s first Markdown table as rows of {header: cell}."""
    out, heading, lines = {}, None, md.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("## "):
            heading = line[3:]
        elif line.startswith("| ") and heading and heading not in out and i + 1 < len(lines):
            header = [c.strip() for c in line.strip("|").split(" | ")]
            rows = []
            for row in lines[i + 2 :]:
                if not row.startswith("| "):
                    break
                rows.append(
                    dict(zip(header, (c.strip() for c in row.strip("|").split(" | ")), strict=True))
                )
            out[heading] = rows
    return out


def test_the_first_line_ships_the_fastest_variant_that_does_not_fail(result) -> None:
    md = Path(result["compare_md"]).read_text()
    first = md.split("\n\n")[1]
    # int8 of job 0 (900 images/s) fails its bar; onnxruntime_int8 of job 0 (600) is undecided
    assert first.startswith(
        "**Ship `onnxruntime_int8` of job `0` (accuracy undecided) at batch "
        "32**: 600.0 images/s, p99 latency 64.00 ms, top-1 88.0% [83.0, "
        "92.0], n=200, 6.00× the throughput of its own job's "
        "`eager_fp32`"
    ), first
    assert (
        "overrides `model=resnet18` (model `resnet18`, trained to test accuracy 90.0% "
        "[82.6, 94.5], n=100)" in first
    )
    assert (result["ship"]["job"], result["ship"]["variant"]) == ("0", "onnxruntime_int8")
    # the other batch size gets its own line
    assert "- At batch 1: `inductor_fp32` of job `1`, 150.0 images/s, p99 latency 8.00 ms" in md


def test_one_row_per_job_and_variant_at_each_batch_size(result) -> None:
    tables = md_tables(Path(result["compare_md"]).read_text())
    ref = tables["Batch 32 (reference)"]
    assert [(r["job"], r["variant"]) for r in ref] == [
        ("0", "eager_fp32"),
        ("0", "inductor_int8"),
        ("0", "onnxruntime_int8"),
        ("0", "trt_fp16"),
        ("1", "eager_fp32"),
        ("1", "inductor_fp32"),
    ]
    row = {(r["job"], r["variant"]): r for r in ref}
    ort = row["0", "onnxruntime_int8"]
    assert ort == {
        "job": "0",
        "overrides": "model=resnet18",
        "model": "resnet18",
        # logged as train.test_acc (no unit in the name): read as logged
        "test accuracy (trained)": "90.0% [82.6, 94.5], n=100",
        "variant": "onnxruntime_int8",
        "back end, precision": "onnxruntime int8",
        "status": "ok",
        "top-1 (variant)": "88.0% [83.0, 92.0], n=200",
        "verdict": "undecided",
        "throughput (img/s)": "600.0",
        "p99 (ms)": "64.00",
        "speed-up": "6.00×",
        "size (MB)": "12.5",
        "Pareto": "yes",
    }
    # already percent: kept as is
    assert row["1", "inductor_fp32"]["test accuracy (trained)"] == "85.0% [76.7, 90.7], n=100"
    assert row["0", "trt_fp16"]["status"] == "skipped"
    assert row["0", "trt_fp16"]["throughput (img/s)"] == row["0", "trt_fp16"]["Pareto"] == "—"
    assert [(r["job"], r["variant"], r["Pareto"]) for r in tables["Batch 1"]] == [
        ("0", "eager_fp32", "—"),
        ("0", "inductor_int8", "—"),
        ("0", "onnxruntime_int8", "—"),
        ("1", "eager_fp32", "—"),
        ("1", "inductor_fp32", "—"),
    ]
    jobs = tables["Jobs"]
    assert [(j["job"], j["overrides"], j["benchmark rows"]) for j in jobs] == [
        ("0", "model=resnet18", "7"),
        ("1", "model=mobilenet_v3_small", "4"),
    ]


def test_other_sweeps_and_lone_runs_do_not_appear(result) -> None:
    md = Path(result["compare_md"]).read_text()
    assert "resnet50" not in md and "not-a-sweep" not in md and "5000" not in md
    assert result["jobs"] == ["0", "1"]


def test_pareto_frontier_across_jobs_and_its_chart(result) -> None:
    front = {p["label"]: p["on_frontier"] for p in result["pareto"]}
    # job 1's eager_fp32 (300/s, 85%) is beaten by its inductor_fp32 (500/s, 89%) on both axes
    assert front == {
        "0/eager_fp32": True,
        "0/inductor_int8": True,
        "0/onnxruntime_int8": True,
        "1/eager_fp32": False,
        "1/inductor_fp32": True,
    }
    chart = Path(result["chart"])
    assert chart.name == "compare_pareto.png" and chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert chart.stat().st_size > 5000
    md = Path(result["compare_md"]).read_text()
    assert "![top-1 (95% intervals) against throughput at batch 32" in md
    assert "](compare_pareto.png)" in md
    assert (
        "On the Pareto frontier (no other (job, variant) is at least as fast and as accurate,"
        " and better in one): `0/eager_fp32`, `1/inductor_fp32`, `0/onnxruntime_int8`, "
        "`0/inductor_int8`."
    ) in md


def test_frontier_keeps_ties_and_drops_points_beaten_on_one_axis() -> None:
    pts = [
        {"label": k, "throughput": t, "top1_pct": a}
        for k, t, a in (
            ("a", 100.0, 90.0),
            ("twin of a", 100.0, 90.0),
            ("as fast, less accurate", 100.0, 80.0),
            ("as accurate, slower", 50.0, 90.0),
        )
    ]
    front = {p["label"]: p["on_frontier"] for p in pareto.mark_frontier(pts)}
    assert front == {
        "a": True,
        "twin of a": True,
        "as fast, less accurate": False,
        "as accurate, slower": False,
    }


def test_html_is_self_contained(result) -> None:
    page = Path(result["compare_html"]).read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<link" not in page and "<script" not in page and 'href="http' not in page
    assert "Ship <code>onnxruntime_int8</code> of job <code>0</code>" in page


def test_a_filter_selects_parent_runs_of_the_experiment(cfg, store, tmp_path) -> None:
    res = compare.run(
        cfg,
        filter_string="tags.sweep_overrides = 'model=mobilenet_v3_small'",
        uri=store,
        out=tmp_path,
    )
    assert res["jobs"] == ["1"]
    assert (res["ship"]["job"], res["ship"]["variant"]) == ("1", "inductor_fp32")
    with pytest.raises(InputError, match="invalid"):
        compare.run(cfg, filter_string="tags.x ==== 1", uri=store, out=tmp_path)


def test_reference_batch_is_chosen_with_batch(cfg, store, tmp_path) -> None:
    res = compare.run(cfg, sweep=SWEEP, uri=store, out=tmp_path, batch=1)
    assert res["reference_batch"] == 1
    assert (res["ship"]["job"], res["ship"]["variant"]) == ("1", "inductor_fp32")
    assert (
        Path(res["compare_md"])
        .read_text()
        .split("\n\n")[1]
        .startswith("**Ship `inductor_fp32` of job `1` at batch 1**")
    )


def test_the_unit_is_read_from_the_name_and_old_names_are_read_as_logged_and_said(
    cfg, store, tmp_path
) -> None:
    legacy: set[str] = set()
    assert compare.metric({"top1_pct": 0.5, "top1": 80.0}, "top1_pct", legacy) == 0.5
    assert legacy == set(), "the _pct name wins and is never rescaled"
    assert compare.metric({"train.test_acc": 0.9}, "train.test_acc_pct", legacy) == 0.9
    assert legacy == {"train.test_acc"}, "an old name is read as logged, not guessed to percent"
    assert compare.metric({}, "top1_pct", legacy) is None
    md = Path(compare.run(cfg, sweep=SWEEP, uri=store, out=tmp_path)["compare_md"]).read_text()
    assert (
        "1 job(s) were logged before metric names carried their unit and are read by the old "
        "names, as logged, not rescaled: 0 (`top1`, `top1_ci_high`, `top1_ci_low`, "
        "`train.test_acc`, `train.test_acc_ci_high`, `train.test_acc_ci_low`)"
    ) in md


def test_entry_point_exit_codes(cfg, store, tmp_path, caplog) -> None:
    params = write_params(cfg, tmp_path / "params.yaml")
    out = tmp_path / "out"
    base = ["--params", str(params), "--tracking-uri", store, "--out", str(out)]
    assert compare.main([*base, "--sweep", "no-such-sweep"]) == 2
    assert "no runs of sweep 'no-such-sweep'" in caplog.text
    assert "sweeps there: ['models', 'other']" in caplog.text
    assert not (out / "COMPARE.md").exists()
    assert compare.main([*base, "--sweep", SWEEP, "--batch", "7"]) == 2
    assert "--batch 7 was not measured" in caplog.text
    assert compare.main([*base, "--sweep", SWEEP, "--experiment", "nope"]) == 2
    assert "no MLflow experiment 'nope'" in caplog.text
    missing = f"sqlite:///{tmp_path / 'missing.db'}"
    assert compare.main(["--params", str(params), "--tracking-uri", missing, "--sweep", SWEEP]) == 2
    assert "no MLflow store at" in caplog.text and not (tmp_path / "missing.db").exists()
    assert compare.main([*base, "--sweep", SWEEP]) == 0
    assert (out / "COMPARE.md").is_file() and (out / "COMPARE.html").is_file()
