"""Stage `benchmark`: an honest harness (known-time models, garbage detection, kept failures),
the real table with every row, and child runs on a real `mlflow server`."""

from __future__ import annotations

import functools
import json
import os
import time
import urllib.request

import matplotlib.colors
import matplotlib.image
import numpy as np
import pytest
import torch
from conftest import serve_mlflow

from oipipe.core.config import compose, path
from oipipe.core.errors import ConfigError, InputError
from oipipe.core.files import read_csv
from oipipe.deploy import build
from oipipe.deploy.runtime import Runtime, eager_runtime
from oipipe.measure import pareto, timing
from oipipe.measure.power import PowerSource
from oipipe.training import models
from stages import benchmark, export, optimize

VARIANTS = ["onnxruntime_fp32", "onnxruntime_int8", "eager_bf16", "trt_fp16"]
TINY = [
    "benchmark.presets.default.batch_sizes=[1,8]",
    "benchmark.presets.default.trials=2",
    "benchmark.presets.default.warmup_iters=1",
    "benchmark.presets.default.warmup_seconds=0",
    "benchmark.presets.default.min_iters=3",
    "benchmark.presets.default.min_seconds=0.05",
    "benchmark.threads=1",
    "benchmark.throughput_mode.batch_sizes=[8]",
    "benchmark.throughput_mode.concurrency=2",
]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with a SQLite store."""
    tmp = tmp_path_factory.mktemp("mlflow-server")
    with serve_mlflow(
        tmp / "m.db", tmp / "server.log", "--default-artifact-root", (tmp / "artifacts").as_uri()
    ) as url:
        yield url


@pytest.fixture(scope="module")
def cfg(prepared, trained, tmp_path_factory):
    """Export (ONNX), three cheap CPU variants and a TensorRT one (skipped without CUDA).

    export.max_batch=4: the ExportedProgram of eager_bf16 refuses batch 8, a failure in the middle
    of its benchmark (batch 1 has been timed by then). optimize.allow_emulated: eager_bf16 is
    built on every CPU, bf16 emulated or not (at 64 px and batch 1 that costs seconds)."""
    root = tmp_path_factory.mktemp("bench")
    cfg = compose(
        [
            "data=mirror",
            f"paths.root={root}",
            f"paths.prepared={prepared}",
            f"paths.models={trained.parent}",
            "tracking.enabled=true",
            "export.formats=[onnx]",
            "export.verify_batch_sizes=[1,2]",
            "export.max_batch=4",
            "optimize.calibration_images=16",
            "optimize.calibration_batch=4",
            "optimize.eval_batch=4",
            f"optimize.variants=[{','.join(VARIANTS)}]",
            "optimize.allow_emulated=true",
            *TINY,
        ]
    )
    export.run(cfg)
    for v in VARIANTS:
        optimize.run(cfg, v)
    return cfg


@pytest.fixture(scope="module")
def table(cfg, mlflow_server):
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    try:
        yield benchmark.run(cfg)
    finally:
        mp.undo()


@pytest.mark.slow
def test_every_variant_and_batch_size_is_a_row_failures_included(table, cfg) -> None:
    rows = table["rows"]
    expected = {f"{v}.b{b}" for v in ["eager_fp32", "eager_fp32_nchw", *VARIANTS] for b in (1, 8)}
    assert set(rows) == expected
    for key in (
        "eager_fp32.b1",
        "eager_fp32.b8",
        "eager_fp32_nchw.b8",
        "onnxruntime_fp32.b8",
        "onnxruntime_int8.b8",
        "eager_bf16.b1",
    ):
        r = rows[key]
        assert r["status"] == "ok", r
        assert r["throughput"] > 0 and r["iterations"] >= 6 and r["trials"] == 2
        assert r["throughput_min"] <= r["throughput"] <= r["throughput_max"]
        assert r["latency_p50_ms"] <= r["latency_p90_ms"] <= r["latency_p99_ms"]
        assert r["threads"] == 1 and r["device"] == "cpu"
        assert r["peak_rss_mb"] > 50 and r["gflops_per_s"] > 0 and r["size_mb"] > 1
        assert r["check_agreement_pct"] >= 90 and r["top1_pct"] is not None
        assert r["top1_ci_low_pct"] <= r["top1_pct"] <= r["top1_ci_high_pct"]
        assert r["eval_images"] > 0
        assert r["verdict"] in ("pass", "undecided", "fail")
    for key, r in rows.items():
        if r["status"] != "ok":
            assert r["throughput"] is None and r["speedup"] is None and r["gflops_per_s"] is None
            continue
        # 2 trials: their median is their mean, their std half their spread
        assert r["throughput"] == pytest.approx((r["throughput_min"] + r["throughput_max"]) / 2)
        assert r["throughput_std"] == pytest.approx(
            (r["throughput_max"] - r["throughput_min"]) / 2, abs=1e-9
        )
        # the latencies are ms per batch of the same timed calls: images over their total time
        # is a time-weighted mean of the trials' rates, so it lies between them
        pooled = r["batch"] * 1000 / r["latency_mean_ms"]
        assert r["throughput_min"] * (1 - 1e-9) <= pooled <= r["throughput_max"] * (1 + 1e-9), key
        # the model's FLOPs per image (table, 4 decimals) times images/s; 3 decimals
        assert r["gflops_per_s"] == pytest.approx(
            table["gflops_per_image"] * r["throughput"], abs=5e-5 * r["throughput"] + 5e-4
        ), key
    assert rows["eager_fp32.b8"]["speedup"] == 1.0
    # every speed-up divides by the baseline at the same batch size, rounded to 3 decimals
    base = {b: rows[f"eager_fp32.b{b}"] for b in (1, 8)}
    for key, r in rows.items():
        if r["status"] == "ok":
            b = base[r["batch"]]
            assert r["speedup"] == round(r["throughput"] / b["throughput"], 3), key
            if r["throughput_concurrent"]:
                assert r["speedup_concurrent"] == round(
                    r["throughput_concurrent"] / b["throughput_concurrent"], 3
                ), key
    # the NCHW row is divided by the channels_last baseline, like every other row
    nchw = rows["eager_fp32_nchw.b8"]
    assert nchw["speedup"] == pytest.approx(  # speed-ups are rounded to 3 decimals
        nchw["throughput"] / rows["eager_fp32.b8"]["throughput"], abs=6e-4
    )
    assert table["baseline_note"] == "eager fp32, channels_last, inference_mode"
    assert table["eval_splits"] == ["val", "test"]
    # the winner at each batch: the fastest row whose verdict is not a fail
    for b in ("1", "8"):
        w = table["winners"][b]
        eligible = [
            r
            for r in rows.values()
            if r["batch"] == int(b) and r["status"] == "ok" and r["verdict"] != "fail"
        ]
        assert w["variant"] == max(eligible, key=lambda r: r["throughput"])["variant"]
        assert w["verdict"] == rows[f"{w['variant']}.b{b}"]["verdict"]
    assert table["best_variant"] == table["winners"]["8"]["variant"]
    # throughput mode at batch 8 only: 2 processes of 1 thread, beside the one-call figures
    for key, r in rows.items():
        if r["batch"] == 8 and r["status"] == "ok":
            assert r["concurrency"] == 2 and r["throughput_concurrent"] > 0, r
            assert (
                r["throughput_concurrent_min"]
                <= r["throughput_concurrent"]
                <= r["throughput_concurrent_max"]
            ), key
            assert r["concurrency_method"] == "2 processes x 1 threads, one request each"
        else:
            assert r["throughput_concurrent"] is None and r["concurrency"] is None, key
    assert rows["eager_fp32.b8"]["speedup_concurrent"] == 1.0
    w = table["winners_throughput_mode"]["8"]
    eligible = [
        r
        for r in rows.values()
        if r["batch"] == 8 and r["throughput_concurrent"] and r["verdict"] != "fail"
    ]
    assert w["variant"] == max(eligible, key=lambda r: r["throughput_concurrent"])["variant"]
    assert w["concurrency_method"] == rows[f"{w['variant']}.b8"]["concurrency_method"]
    assert set(table["winners_throughput_mode"]) == {"8"}
    assert rows["onnxruntime_int8.b8"]["precision"] == "int8"
    # raised in the middle of its benchmark: a failed row with the error, the others kept
    bad = rows["eager_bf16.b8"]
    assert bad["status"] == "failed" and bad["error"] and bad["throughput"] is None
    skipped = rows["trt_fp16.b8"]
    assert skipped["status"] == "skipped"
    assert skipped["error"] == build.missing(("torch_tensorrt", "cuda"))
    assert table["reference_batch"] == 8
    assert table["machine"]["cores"] == os.cpu_count() and table["machine"]["torch"]
    on_disk = json.loads((path(cfg, "metrics") / "benchmark.json").read_text())
    assert on_disk["rows"] == rows
    # the plots' CSV is the table: every row, every column (floats to 4 decimals, None empty)
    csv_rows = read_csv(path(cfg, "plots") / "benchmark.csv")
    assert len(csv_rows) == len(rows)
    for c in csv_rows:
        r = rows[c["label"].replace("@", ".")]
        assert c == {**{k: _as_csv(r[k]) for k in benchmark.COLUMNS}, "label": c["label"]}
    # the charts drawn from those rows: throughput and speed-up one series of bars
    # (matplotlib's first colour), latency three (p50, p90, p99)
    cycle = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for name, series in (("throughput", 1), ("latency", 3), ("speedup", 1)):
        png = matplotlib.image.imread(path(cfg, "plots") / f"benchmark_{name}.png")[..., :3]
        drawn = [_pixels(png, colour) for colour in cycle[: series + 1]]
        assert min(drawn[:series]) > 500 and drawn[series] == 0, (name, drawn)
    pareto = read_csv(path(cfg, "plots") / "pareto.csv")
    ok8 = {k for k, r in rows.items() if r["batch"] == 8 and r["status"] == "ok"}
    assert {f"{p['variant']}.b8" for p in pareto} == ok8
    for p in pareto:
        r = rows[f"{p['variant']}.b8"]
        assert {k: p[k] for k in ("throughput", "top1_pct", "verdict")} == {
            k: _as_csv(r[k]) for k in ("throughput", "top1_pct", "verdict")
        }
    fastest = max(pareto, key=lambda p: float(p["throughput"]))
    assert fastest["on_frontier"] == "True"  # nothing is faster, so nothing dominates it
    png = matplotlib.image.imread(path(cfg, "plots") / "pareto.png")[..., :3]
    assert len(np.unique(png.reshape(-1, 3), axis=0)) > 20  # points, intervals, labels: drawn


def _as_csv(v) -> str:
    """A value as benchmark.csv writes it."""
    return "" if v is None else str(round(v, 4) if isinstance(v, float) else v)


def _pixels(png: np.ndarray, colour: str) -> int:
    """How many pixels of an RGB image (floats in [0, 1]) are `colour`, within 8-bit rounding."""
    rgb = np.array(matplotlib.colors.to_rgb(colour))
    return int((np.abs(png - rgb) < 1.5 / 255).all(axis=-1).sum())


@pytest.mark.slow
def test_child_runs_reach_a_real_mlflow_server(table, mlflow_server, cfg) -> None:
    def post(endpoint: str, body: dict) -> dict:
        req = urllib.request.Request(
            f"{mlflow_server}/api/2.0/mlflow/{endpoint}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    exps = post("experiments/search", {"max_results": 10})["experiments"]
    exp_id = next(e["experiment_id"] for e in exps if e["name"] == "oi-pipeline")
    runs = post("runs/search", {"experiment_ids": [exp_id], "max_results": 100})["runs"]
    parents = [
        r
        for r in runs
        if not any(t["key"] == "mlflow.parentRunId" for t in r["data"].get("tags", []))
    ]
    assert len(parents) == 1
    parent = parents[0]
    ptags = {t["key"]: t["value"] for t in parent["data"]["tags"]}
    assert ptags["machine.cpu"] and ptags["machine.torch"] and ptags["git_commit"]
    children = post(
        "runs/search",
        {
            "experiment_ids": [exp_id],
            "max_results": 100,
            "filter": f"tags.mlflow.parentRunId = '{parent['info']['run_id']}'",
        },
    )["runs"]
    assert len(children) == len(table["rows"])
    by_name, runs_of = {}, {}
    for c in children:
        params = {p["key"]: p["value"] for p in c["data"]["params"]}
        metrics = {m["key"]: m["value"] for m in c["data"].get("metrics", [])}
        name = f"{params['variant']}.b{params['batch_size']}"
        by_name[name] = (params, metrics)
        runs_of[name] = ({t["key"]: t["value"] for t in c["data"]["tags"]}, c["info"]["status"])
    params, metrics = by_name["onnxruntime_int8.b8"]
    assert params["backend"] == "onnxruntime" and params["precision"] == "int8"
    want = table["rows"]["onnxruntime_int8.b8"]
    assert metrics["throughput"] == pytest.approx(want["throughput"])
    assert metrics["latency_p99_ms"] == pytest.approx(want["latency_p99_ms"])
    assert {"top1_pct", "agreement_pct", "size_mb", "build_seconds", "speedup"} <= set(metrics)
    assert "throughput" not in by_name["trt_fp16.b1"][1]
    # percentages, as in benchmark.json; the verdict as a tag and as a number
    assert metrics["top1_pct"] == pytest.approx(want["top1_pct"]) and metrics["top1_pct"] > 1
    assert metrics["agreement_pct"] == pytest.approx(want["agreement_pct"])
    assert metrics["agreement_pct"] > 1
    code = {"pass": 1, "undecided": 0, "fail": -1}[want["verdict"]]
    assert metrics["verdict_code"] == code and runs_of["onnxruntime_int8.b8"][0]["verdict"]
    # each child names its model and pipeline; failed and skipped rows do not end FINISHED
    for name, (tags, status) in runs_of.items():
        assert tags["model.name"] == cfg.model.name, name
        assert tags["pipeline_key"] == ptags["pipeline_key"], name
        assert (
            status
            == {"ok": "FINISHED", "failed": "FAILED", "skipped": "KILLED"}[
                table["rows"][name]["status"]
            ]
        ), name
    assert runs_of["eager_bf16.b8"][1] == "FAILED" and runs_of["trt_fp16.b8"][1] == "KILLED"
    # the parent explains its best_speedup: which variant, its verdict, the winner per batch
    pmetrics = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
    assert ptags["benchmark.best_variant"] == table["best_variant"]
    assert pmetrics["benchmark.best_speedup"] == pytest.approx(table["best_speedup"])
    best_row = table["rows"][f"{table['best_variant']}.b{table['reference_batch']}"]
    assert pmetrics["benchmark.best_throughput"] == pytest.approx(best_row["throughput"])
    assert (
        pmetrics["benchmark.best_verdict_code"]
        == {"pass": 1, "undecided": 0}[table["best_verdict"]]
    )
    for b in ("1", "8"):
        assert ptags[f"benchmark.winner.b{b}"] == str(table["winners"][b]["variant"])
    exp = post("experiments/search", {"max_results": 10})["experiments"]
    kind = {t["key"]: t["value"] for e in exp if e["name"] == "oi-pipeline" for t in e["tags"]}
    assert kind["mlflow.experimentKind"] == "custom_model_development"


def _row(
    variant: str,
    batch: int,
    throughput: float,
    verdict: str,
    top1: float = 90.0,
    status: str = "ok",
) -> dict:
    return {
        "variant": variant,
        "batch": batch,
        "status": status,
        "throughput": throughput,
        "verdict": verdict,
        "top1_pct": top1,
        "top1_ci_low_pct": top1 - 5,
        "top1_ci_high_pct": top1 + 5,
        "eval_images": 72,
        "latency_p99_ms": 1.0,
        "speedup": throughput / 10,
    }


def test_the_winner_is_the_fastest_variant_that_does_not_fail() -> None:
    rows = [
        _row("eager_fp32", 32, 10, "pass"),
        _row("inductor_int8", 32, 80, "fail", 70.0),
        _row("onnxruntime_int8", 32, 60, "undecided"),
        _row("inductor_fp32", 32, 40, "pass"),
        _row("trt_fp16", 32, 500, "pass", status="skipped"),
        _row("inductor_int8", 1, 9, "fail"),
    ]
    w = benchmark.winner(rows, 32)
    assert (w["variant"], w["verdict"], w["speedup"]) == ("onnxruntime_int8", "undecided", 6.0)
    assert benchmark.winner(rows, 1) == {"variant": None, "batch": 1}
    front = {p["variant"]: p["on_frontier"] for p in pareto.pareto_points(rows, 32)}
    # int8 is fastest (on the frontier, drawn red); inductor_fp32 is slower and no more accurate
    assert front == {
        "eager_fp32": False,
        "inductor_int8": True,
        "onnxruntime_int8": True,
        "inductor_fp32": False,
    }


def test_the_baseline_is_channels_last_under_inference_mode(trained) -> None:
    model, _ = models.load_trained(trained)
    rt = eager_runtime(model, "cpu")
    x = rt.prepare(torch.rand(2, 3, 32, 32))
    assert x.is_contiguous(memory_format=torch.channels_last)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert rt.call(x).is_inference()
    nchw = eager_runtime(models.load_trained(trained)[0], "cpu", channels_last=False)
    assert nchw.prepare(torch.rand(2, 3, 32, 32)).is_contiguous()
    np.testing.assert_allclose(
        rt(torch.ones(2, 3, 32, 32)), nchw(torch.ones(2, 3, 32, 32)), rtol=1e-4, atol=1e-4
    )


def sleeper(seconds: float, classes: int = 3) -> Runtime:
    """A model whose forward takes a known time and returns the fp32 model's answer."""

    def call(x: torch.Tensor) -> torch.Tensor:
        time.sleep(seconds)
        return torch.nn.functional.one_hot(x[:, 0, 0, 0].long().abs() % classes, classes).float()

    return Runtime(call=call, prepare=lambda x: x, logits=lambda y: y.numpy())


def test_a_model_that_sleeps_a_known_time_measures_that_time() -> None:
    batches = [torch.rand(4, 3, 8, 8) for _ in range(3)]
    protocol = {
        "warmup_iters": 2,
        "warmup_seconds": 0.0,
        "min_iters": 10,
        "min_seconds": 0.3,
        "trials": 3,
    }
    res = timing.time_runtime(sleeper(0.02), batches, protocol)
    # sleep(0.02) overshoots by the scheduler's slack (~0.1-1 ms); never undershoots
    assert 0.020 <= res["latency_p50_ms"] / 1000 < 0.024
    assert 4 / 0.024 < res["throughput"] <= 4 / 0.020
    # each trial runs until 0.3 s have passed: 15 calls of 20 ms (14 when the scheduler adds
    # 1.5 ms to each, as it does on a busy machine; never 16: sleep never undershoots), so the
    # timed calls add up to the 3 trials' 0.9 s but for the loop's microseconds between them
    assert 3 * 10 <= res["iterations"] <= 3 * 15
    assert res["latency_mean_ms"] * res["iterations"] > 0.8 * 3 * 300
    assert res["trials"] == 3 and res["throughput_min"] <= res["throughput_max"]


class Probe:
    """A runtime that records what the harness does to it. Batch k is filled with k; `prepare`
    adds 0.5 (so a call can tell a prepared input) after sleeping `prepare_s` (a host-to-device
    copy); the first `slow_calls` calls sleep `slow_s` (compilation, autotuning), later calls
    return at once. `calls` holds each call's batch tag, in order."""

    def __init__(self, slow_calls: int = 0, slow_s: float = 0.0, prepare_s: float = 0.0):
        self.slow_calls, self.slow_s, self.prepare_s = slow_calls, slow_s, prepare_s
        self.calls: list[float] = []
        self.prepared = 0

    @staticmethod
    def batches(count: int) -> list[torch.Tensor]:
        return [torch.full((4, 3, 8, 8), float(k)) for k in range(count)]

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.prepare_s)
        self.prepared += 1
        return x + 0.5

    def call(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(float(x[0, 0, 0, 0]))
        if len(self.calls) <= self.slow_calls:
            time.sleep(self.slow_s)
        return x

    def runtime(self) -> Runtime:
        return Runtime(call=self.call, prepare=self.prepare, logits=lambda y: y.numpy())


# A call that returns at once takes microseconds; the medians below allow it 100 ms, which a
# loaded 2-core machine does not reach for half the calls, while a sleep of 250 ms that got
# timed can only read longer (sleep never returns early).
FAST_MS = 100


def test_warm_up_calls_are_made_and_never_timed() -> None:
    """The first 5 calls take 250 ms (a JIT compiling); warmup_iters=5 keeps all of them out:
    timed without a warm-up, 5 of the 9 timed calls would be slow and so would their median."""
    probe = Probe(slow_calls=5, slow_s=0.25)
    protocol = {
        "warmup_iters": 5,
        "warmup_seconds": 0.0,
        "min_iters": 9,
        "min_seconds": 0.0,
        "trials": 1,
    }
    res = timing.time_runtime(probe.runtime(), Probe.batches(3), protocol)
    assert res["latency_p50_ms"] < FAST_MS, res
    assert res["iterations"] == 9 and len(probe.calls) == 5 + 9  # made, and not counted


def test_input_conversion_is_never_timed() -> None:
    """`prepare` sleeps 250 ms; it runs once per batch before timing, and every timed call gets
    its prepared input: a harness that converted inside the timed loop would read >= 250 ms."""
    probe = Probe(prepare_s=0.25)
    protocol = {
        "warmup_iters": 1,
        "warmup_seconds": 0.0,
        "min_iters": 5,
        "min_seconds": 0.0,
        "trials": 2,
    }
    res = timing.time_runtime(probe.runtime(), Probe.batches(2), protocol)
    assert res["latency_p50_ms"] < FAST_MS, res
    assert probe.prepared == 2
    assert set(probe.calls) == {0.5, 1.5}  # prepared inputs only


def test_every_input_batch_is_timed_in_turn() -> None:
    """The timed calls (the last `iterations` ones) go through all 3 batches in rotation, so a
    variant cannot be timed on one batch it has cached."""
    probe = Probe()
    protocol = {
        "warmup_iters": 2,
        "warmup_seconds": 0.0,
        "min_iters": 9,
        "min_seconds": 0.0,
        "trials": 2,
    }
    res = timing.time_runtime(probe.runtime(), Probe.batches(3), protocol)
    timed = probe.calls[-res["iterations"] :]
    assert len(timed) == res["iterations"] == 18
    assert sorted(timed.count(tag) for tag in (0.5, 1.5, 2.5)) == [6, 6, 6], timed
    assert all(a != b for a, b in zip(timed, timed[1:], strict=False)), timed  # never twice


def test_a_power_source_gives_each_row_its_power_and_energy_per_image() -> None:
    """What a GPU row gets through NVML, with a source that draws a known 150 W: the energy per
    image is the power over the images per second of the same trials."""
    batches = [torch.rand(4, 3, 8, 8) for _ in range(3)]
    protocol = {
        "warmup_iters": 1,
        "warmup_seconds": 0.0,
        "min_iters": 5,
        "min_seconds": 0.3,
        "trials": 3,
    }
    res = timing.time_runtime(sleeper(0.02), batches, protocol, PowerSource(lambda: 150.0))
    assert res["power_avg_w"] == pytest.approx(150.0)
    assert res["power_source"] == "nvml_power_samples"
    assert res["energy_per_image_j"] == pytest.approx(150.0 / res["throughput"], rel=0.1)
    assert "power_avg_w" not in timing.time_runtime(sleeper(0.0), batches, protocol)


@pytest.mark.slow
def test_throughput_mode_runs_its_processes_together() -> None:
    """2 processes of a model that sleeps 40 ms per batch of 4: together 200 images/s, twice
    what one call at a time gives; processes that ran one after another would show 100."""
    batches = [torch.rand(4, 3, 8, 8) for _ in range(3)]
    protocol = {
        "warmup_iters": 1,
        "warmup_seconds": 0.0,
        "min_iters": 5,
        "min_seconds": 0.4,
        "trials": 2,
    }
    res = timing.time_processes(
        functools.partial(sleeper, 0.04), batches, protocol, concurrency=2, threads=2
    )
    assert (res["concurrency"], res["concurrency_method"]) == (
        2,
        "2 processes x 1 threads, one request each",
    )
    assert 2 * 4 / 0.046 < res["throughput_concurrent"] <= 2 * 4 / 0.040
    assert (
        res["throughput_concurrent_min"]
        <= res["throughput_concurrent"]
        <= res["throughput_concurrent_max"]
    )


@pytest.mark.slow
def test_a_failing_throughput_mode_process_is_an_error_not_a_hang() -> None:
    batches = [torch.rand(4, 3, 8, 8) for _ in range(2)]
    protocol = {
        "warmup_iters": 1,
        "warmup_seconds": 0.0,
        "min_iters": 2,
        "min_seconds": 0.0,
        "trials": 2,
    }
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="throughput-mode process failed: .*no such artifact"):
        timing.time_processes(
            functools.partial(_missing, "no such artifact"),
            batches,
            protocol,
            concurrency=2,
            threads=2,
            timeout=120,
        )
    assert time.perf_counter() - t0 < 60


def _missing(what: str) -> Runtime:
    raise FileNotFoundError(what)


def test_garbage_outputs_and_constant_inputs_fail_before_timing() -> None:
    real = [torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    timing.check_inputs(real)
    with pytest.raises(timing.CheckFailed, match="constant"):
        timing.check_inputs([torch.zeros(8, 3, 8, 8), *real])
    with pytest.raises(timing.CheckFailed, match="identical"):
        timing.check_inputs([real[0], real[0].clone()])
    reference = [np.eye(3)[np.arange(8) % 3] for _ in real]
    rng = np.random.default_rng(0)
    fast_garbage = Runtime(
        call=lambda x: None, prepare=lambda x: x, logits=lambda y: rng.normal(size=(8, 3))
    )
    with pytest.raises(
        timing.CheckFailed,
        match=r"agreement with fp32 .* is \d+\.\d%, below .*min_agreement_pct=90",
    ):
        timing.check_outputs(fast_garbage, real, reference, 90)
    nan = Runtime(
        call=lambda x: None, prepare=lambda x: x, logits=lambda y: np.full((8, 3), np.nan)
    )
    with pytest.raises(timing.CheckFailed, match="non-finite"):
        timing.check_outputs(nan, real, reference, 90)
    right = Runtime(
        call=lambda x: None, prepare=lambda x: x, logits=lambda y: np.eye(3)[np.arange(8) % 3]
    )
    assert timing.check_outputs(right, real, reference, 90) == 100.0


@pytest.mark.slow
def test_a_crashing_variant_process_becomes_failed_rows(table, cfg, tmp_path) -> None:
    artifact = path(cfg, "optimized") / "onnxruntime_int8" / "model.onnx"
    good = artifact.read_bytes()
    artifact.write_bytes(good[:2048])
    try:
        rows = benchmark.run_worker(cfg, "onnxruntime_int8", tmp_path)
    finally:
        artifact.write_bytes(good)
    assert [r["batch"] for r in rows] == [1, 8]
    assert all(r["status"] == "failed" and "exited with code 1" in r["error"] for r in rows)


@pytest.mark.slow
def test_notebook_protocol_and_bad_settings(cfg) -> None:
    nb = compose(["benchmark.protocol=notebook"]).benchmark
    p = nb.presets[nb.protocol]
    assert (list(p.batch_sizes), p.warmup_iters, p.min_iters, p.trials) == ([128], 50, 100, 1)
    assert list(p.variants) == ["trt_fp32", "trt_fp16"]
    with pytest.raises(ConfigError, match="unknown benchmark.protocol 'fast'"):
        compose(["benchmark.protocol=fast"])
    with pytest.raises(ConfigError, match="input_batches"):
        compose(["benchmark.input_batches=1"])
    missing = compose(
        [
            f"paths.root={cfg.paths.root}",
            f"paths.models={cfg.paths.models}",
            f"paths.prepared={cfg.paths.prepared}",
            "data=mirror",
            "optimize.variants=[inductor_int8]",
        ]
    )
    with pytest.raises(InputError, match=r"optimize@inductor_int8"):
        benchmark.run(missing)
