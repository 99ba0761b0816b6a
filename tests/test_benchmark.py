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
from oipipe.measure import pareto, rounds, timing
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
    # the baseline at each batch is the faster eager layout, by the median per-round ratio
    for b in (1, 8):
        cl, nchw = rows[f"eager_fp32.b{b}"], rows[f"eager_fp32_nchw.b{b}"]
        ratio = np.median(np.array(nchw["throughput_rounds"]) / np.array(cl["throughput_rounds"]))
        assert table["baselines"][str(b)] == ("eager_fp32_nchw" if ratio > 1 else "eager_fp32")
    assert table["baseline"] == table["baselines"]["8"]
    # every speed-up is the median of per-round ratios to its batch's baseline, 3 decimals
    base = {b: rows[f"{table['baselines'][str(b)]}.b{b}"] for b in (1, 8)}
    for b in (1, 8):
        assert base[b]["speedup"] == 1.0 and base[b]["speedup_min"] == 1.0
    for key, r in rows.items():
        if r["status"] == "ok":
            b = base[r["batch"]]
            assert len(r["throughput_rounds"]) == 2 and r["baseline"] == b["variant"], key
            ratios = np.array(r["throughput_rounds"]) / np.array(b["throughput_rounds"])
            assert r["speedup"] == round(float(np.median(ratios)), 3), key
            assert r["speedup_min"] <= r["speedup"] <= r["speedup_max"], key
            if r["throughput_concurrent"]:
                assert r["speedup_concurrent"] == round(
                    r["throughput_concurrent"] / b["throughput_concurrent"], 3
                ), key
    # interleaved: each round timed every row of its batch once, the order rotated each round
    timed = {
        b: {k for k, r in rows.items() if r["batch"] == b and r["status"] == "ok"} for b in (1, 8)
    }
    assert [(r["batch"], r["round"]) for r in table["rounds"]] == [(1, 0), (1, 1), (8, 0), (8, 1)]
    for r in table["rounds"]:
        assert {f"{v}.b{r['batch']}" for v in r["order"]} == timed[r["batch"]]
    first, second = (r["order"] for r in table["rounds"][2:])
    assert second == first[1:] + first[:1]
    assert len(table["load_before"]) == len(table["load_after"]) == 3
    assert table["threads_reason"] == "1: benchmark.threads"
    # how far from the limit: peaks of the precisions that ran (fp32, int8, bf16), measured
    # with the rows' one thread; every ok row a share of its own precision's peak
    peaks = table["peaks"]["cpu"]
    assert peaks["threads"] == 1 and peaks["bandwidth_gbs"] > 0
    assert {"fp32_gflops", "int8_gops", "bf16_gflops"} <= set(peaks)
    per = table["traffic"]
    assert per["fixed_bytes"] > 0 and per["bytes_per_image"] > 0
    key = {"fp32": "fp32_gflops", "int8": "int8_gops", "bf16": "bf16_gflops"}
    for name, r in rows.items():
        if r["status"] == "ok":
            assert r["peak_gflops"] == peaks[key[r["precision"]]], name
            assert 0 < r["peak_pct"] < 100, name
            assert r["peak_pct"] == pytest.approx(
                100 * r["gflops_per_s"] / r["peak_gflops"], abs=0.01
            )
            assert r["intensity_flop_per_byte"] > 0
    for b in (1, 8):  # the weights are read once per call: more images, more FLOPs per byte
        assert (
            rows[f"eager_fp32.b{b}"]["intensity_flop_per_byte"]
            < rows["eager_fp32.b8"]["intensity_flop_per_byte"]
            or b == 8
        )
    roof = matplotlib.image.imread(path(cfg, "plots") / "roofline.png")[..., :3]
    assert len(np.unique(roof.reshape(-1, 3), axis=0)) > 20
    assert table["eval_splits"] == ["val", "test"]
    # the winner at each batch: the fastest row whose verdict is not a fail, or one whose
    # speed ties with it and whose verdict, then top-1, then size is better
    for b in ("1", "8"):
        _is_the_winner(table["winners"][b], rows, int(b), "throughput")
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
    assert base[8]["speedup_concurrent"] == 1.0
    w = table["winners_throughput_mode"]["8"]
    _is_the_winner(w, rows, 8, "throughput_concurrent")
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


def _is_the_winner(w: dict, rows: dict, batch: int, key: str) -> None:
    eligible = [
        r
        for r in rows.values()
        if r["batch"] == batch and r["status"] == "ok" and r["verdict"] != "fail" and r.get(key)
    ]
    fastest = max(eligible, key=lambda r: r[key])
    got = rows[f"{w['variant']}.b{batch}"]
    assert w["verdict"] == got["verdict"]
    tied = sorted(
        r["variant"] for r in eligible if r is not fastest and pareto.speeds_tie(fastest, r, key)
    )
    assert sorted(w["tied_with"] + [w["variant"]]) == sorted(tied + [fastest["variant"]])
    if got is not fastest:
        rank = pareto.VERDICT_ORDER
        assert (rank[got["verdict"]], -got["top1_pct"]) <= (
            rank[fastest["verdict"]],
            -fastest["top1_pct"],
        )


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
        assert ptags[f"benchmark.baseline.b{b}"] == table["baselines"][b]
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
        rows, _ = benchmark.measure(cfg, ["onnxruntime_int8", "onnxruntime_fp32"], tmp_path)
    finally:
        artifact.write_bytes(good)
    got = {(r["variant"], r["batch"]): r for r in rows}
    assert sorted(got) == [(v, b) for v in ("onnxruntime_fp32", "onnxruntime_int8") for b in (1, 8)]
    for b in (1, 8):
        bad = got["onnxruntime_int8", b]
        assert bad["status"] == "failed" and "exited with code 1" in bad["error"], bad
        assert got["onnxruntime_fp32", b]["status"] == "ok"  # the crash lost nothing else


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


class Burst:
    """A machine whose load comes and goes: every probe call sleeps its cost, times `factor`
    while the machine-wide call count is in [start, end) (a burst of other work)."""

    def __init__(self, start: int, end: int, factor: float) -> None:
        self.start, self.end, self.factor, self.count = start, end, factor, 0

    def runtime(self, cost_s: float) -> Runtime:
        def call(x: torch.Tensor) -> torch.Tensor:
            slow = self.start <= self.count < self.end
            self.count += 1
            time.sleep(cost_s * (self.factor if slow else 1.0))
            return x

        return Runtime(call=call, prepare=lambda x: x, logits=lambda y: y.numpy())


def test_a_load_burst_in_one_round_moves_every_row_of_that_round() -> None:
    """Three probes of known cost (10, 20, 40 ms a call), 5 calls a trial, 3 rounds; a burst
    triples every call's time for as long as one round lasts (calls 15-29). Interleaved, it
    slows every probe in that round and no per-round ratio moves; timed one probe after
    another, it would have slowed one probe's trials only."""
    burst = Burst(15, 30, 3.0)
    protocol = {"warmup_iters": 0, "warmup_seconds": 0.0, "min_iters": 5, "min_seconds": 0.0}
    batches = {4: Probe.batches(2)}
    probes = [
        rounds.LocalContender(name, burst.runtime(cost), batches, protocol)
        for name, cost in (("a", 0.010), ("b", 0.020), ("c", 0.040))
    ]
    out = rounds.interleave(probes, [4], 3)
    assert [r["order"] for r in out.rounds] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    rates = {
        name: timing.summarise([t["times"] for t in out.trials[name, 4]], 4)["throughput_rounds"]
        for name in "abc"
    }
    for name, (r0, r1, r2) in rates.items():
        assert r1 < 0.5 * min(r0, r2), (name, rates)  # every probe slowed in round 1
    for name, expected in (("a", 2.0), ("c", 0.5)):  # against b, round by round
        ratios = rounds.round_ratios(rates[name], rates["b"])
        assert all(abs(r / expected - 1) < 0.2 for r in ratios), (name, ratios)


def test_a_worker_that_dies_fails_its_rows_and_the_others_go_on() -> None:
    class Dies:
        name = "dies"

        def takes(self, batch: int) -> bool:
            return True

        def trial(self, batch: int) -> dict:
            raise rounds.ContenderFailed("worker exited with code 9: killed", fatal=True)

    protocol = {"warmup_iters": 0, "warmup_seconds": 0.0, "min_iters": 2, "min_seconds": 0.0}
    batches = {1: Probe.batches(2), 4: Probe.batches(2)}
    ok = rounds.LocalContender("ok", Probe().runtime(), batches, protocol)
    out = rounds.interleave([Dies(), ok], [1, 4], 2)
    assert out.errors["dies", 1] == "worker exited with code 9: killed"
    assert out.errors["dies", 4].startswith("not timed: at batch 1: worker exited")
    assert [len(out.trials["ok", b]) for b in (1, 4)] == [2, 2]
    assert ("dies", 1) not in out.trials


def _timed_row(variant, batch, rounds_, verdict="pass", top1=90.0, size=10.0) -> dict:
    return {
        **_row(variant, batch, float(np.median(rounds_)), verdict, top1),
        "throughput_rounds": rounds_,
        "throughput_min": min(rounds_),
        "throughput_max": max(rounds_),
        "size_mb": size,
    }


def test_speeds_that_tie_go_to_the_better_verdict_then_accuracy_then_size() -> None:
    # 2% apart and B faster in one round: a tie, so the pass beats the undecided int8
    a = _timed_row("openvino_int8", 32, [138.3, 186.4, 150.0], "undecided", 92.0)
    b = _timed_row("onnxruntime_fp32", 32, [135.5, 140.6, 147.0], "pass", 93.3)
    w = benchmark.winner([a, b], 32)
    assert (w["variant"], w["tied_with"]) == ("onnxruntime_fp32", ["openvino_int8"])
    # 30% faster in every round: no tie, the undecided one ships, labelled by its verdict
    fast = _timed_row("openvino_int8", 32, [190.0, 188.0, 191.0], "undecided", 92.0)
    w = benchmark.winner([fast, b], 32)
    assert (w["variant"], w["verdict"], w["tied_with"]) == ("openvino_int8", "undecided", [])
    # faster in every round but by 3%, within the 5% margin: equal verdicts, higher top-1 wins
    c = _timed_row("x", 32, [103.0, 103.0, 103.0], "pass", 91.0)
    d = _timed_row("y", 32, [100.0, 100.0, 100.0], "pass", 95.0)
    assert benchmark.winner([c, d], 32)["variant"] == "y"
    assert benchmark.winner([c, d], 32, margin_pct=2.0)["variant"] == "x"
    # equal verdicts and top-1: the smaller artifact
    e = _timed_row("big", 32, [101.0, 99.0, 100.0], "pass", 95.0, size=20.0)
    f = _timed_row("small", 32, [100.0, 100.0, 100.0], "pass", 95.0, size=5.0)
    assert benchmark.winner([e, f], 32)["variant"] == "small"
    # rows of different runs (compare: no shared rounds): overlapping trial spreads tie
    g = {**_timed_row("g", 32, [110.0, 120.0, 130.0], "undecided"), "throughput_rounds": None}
    h = {**_timed_row("h", 32, [100.0, 105.0, 112.0], "pass"), "throughput_rounds": None}
    assert pareto.fastest_shippable([g, h])["variant"] == "h"
    h2 = {**h, "throughput_max": 109.0, "throughput": 100.0}
    assert pareto.fastest_shippable([g, h2])["variant"] == "g"


def test_the_baseline_at_each_batch_is_the_faster_layout() -> None:
    """The AVX2 EPYC's figures: NCHW faster at batch 1 (42 against 30 images/s), channels_last
    at 32 (29 against 16.5). A variant at 100 images/s at batch 1 is 2.4x, not 3.3x."""
    rows = [
        _timed_row("eager_fp32", 1, [30.0, 31.0, 29.5]),
        _timed_row("eager_fp32_nchw", 1, [42.0, 41.5, 42.5]),
        _timed_row("eager_fp32", 32, [29.0, 29.5, 29.2]),
        _timed_row("eager_fp32_nchw", 32, [16.5, 16.4, 16.6]),
        _timed_row("onnxruntime_int8", 1, [100.0, 99.0, 102.0]),
    ]
    chosen = benchmark.choose_baselines(rows, [1, 32])
    assert chosen == {1: "eager_fp32_nchw", 32: "eager_fp32"}
    benchmark.add_speedups(rows, chosen)
    assert rows[4]["speedup"] == round(float(np.median([100 / 42, 99 / 41.5, 102 / 42.5])), 3)
    assert rows[4]["baseline"] == "eager_fp32_nchw"
    assert rows[0]["speedup"] < 1 and rows[1]["speedup"] == 1.0
    # one layout missing (it failed): the other is the baseline
    nchw_only = [r for r in rows if r["variant"] != "eager_fp32"]
    assert benchmark.choose_baselines(nchw_only, [1, 32]) == {
        1: "eager_fp32_nchw",
        32: "eager_fp32_nchw",
    }
