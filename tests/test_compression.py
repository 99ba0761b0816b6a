"""The report's compression table reads its numbers from the records and benchmark.json, and its
sentences say whether a compression paid and, where it did not, the profile's memory-bound
operator types (oipipe/reporting/compression.py)."""

from __future__ import annotations

import pytest

from oipipe.reporting import compression
from oipipe.reporting.document import render_markdown
from stages import report


def rec(name: str, precision: str, **kw) -> dict:
    return {"variant": name, "precision": precision, "status": "ok", "verdict": "pass", **kw}


RECORDS = {
    "openvino_fp32": rec("openvino_fp32", "fp32", size_mb=13.1, top1_pct=95.0),
    "openvino_int8": rec(
        "openvino_int8",
        "int8",
        size_mb=3.7,
        top1_pct=94.0,
        top1_ci_low_pct=85.5,
        top1_ci_high_pct=97.6,
        eval_images=72,
        verdict="undecided",
    ),
    "openvino_pruned_fp32": rec(
        "openvino_pruned_fp32",
        "fp32",
        size_mb=7.3,
        top1_pct=93.0,
        params_before=3_373_570,
        params_after=1_900_000,
        model_counts={"flops_per_image": 0.21e9, "fixed_bytes": 8e6, "bytes_per_image": 40e6},
    ),
    "openvino_pruned_int8": rec("openvino_pruned_int8", "int8", status="failed"),
    "onnxruntime_int8": rec("onnxruntime_int8", "int8", size_mb=3.5),  # its twin was not built
}


def bench_rows(**throughputs: float) -> dict:
    rows = {}
    for key, t in throughputs.items():
        name, b = key.rsplit("_b", 1)
        rows[f"{name}.b{b}"] = {"variant": name, "batch": int(b), "status": "ok", "throughput": t}
    return rows


BENCH = {
    "gflops_per_image": 0.3876,
    "traffic": {"fixed_bytes": 14e6, "bytes_per_image": 60e6},
    "reference_batch": 32,
    "rows": bench_rows(
        openvino_fp32_b1=100.0,
        openvino_fp32_b32=200.0,
        openvino_int8_b1=150.0,
        openvino_int8_b32=420.0,
        openvino_pruned_fp32_b1=104.0,
        openvino_pruned_fp32_b32=210.0,
    ),
}
PROFILE = {
    "profiles": {
        "eager_b32": {
            "mode": "eager",
            "batch": 32,
            "types": {
                "convolution": {"time_share_pct": 40.0, "flop_share_pct": 90.0},
                "depthwise convolution": {"time_share_pct": 35.0, "flop_share_pct": 6.0},
                "batch norm": {"time_share_pct": 20.0, "flop_share_pct": 1.0},
            },
        }
    }
}


def test_the_table_reads_each_compression_against_its_twin_from_the_records() -> None:
    rows = {r["variant"]: r for r in compression.table(RECORDS, BENCH)}
    # a failed compression, and one whose twin was not built, have no row
    assert set(rows) == {"openvino_int8", "openvino_pruned_fp32"}
    q, p = rows["openvino_int8"], rows["openvino_pruned_fp32"]
    assert q["twin"] == p["twin"] == "openvino_fp32"
    assert q["gflops"] == q["twin_gflops"] == pytest.approx(0.3876)  # quantized: same network
    assert p["gflops"] == pytest.approx(0.21) and p["twin_gflops"] == pytest.approx(0.3876)
    assert (p["params"], p["twin_params"]) == (1_900_000, 3_373_570)
    assert q["params"] == q["twin_params"]  # no count of its own: unchanged
    assert (q["size_mb"], q["twin_size_mb"]) == (3.7, 13.1)
    assert q["speed_ratio"] == {1: 1.5, 32: 2.1}
    assert p["speed_ratio"] == {1: 1.04, 32: 1.05}
    # bytes at batch 1: fixed + per image, at the element width (int8 a quarter of fp32)
    assert q["twin_mb_moved_b1"] == pytest.approx(74.0)
    assert q["mb_moved_b1"] == pytest.approx(74.0 / 4)
    assert p["mb_moved_b1"] == pytest.approx(48.0)
    assert (q["top1_pct"], q["twin_top1_pct"], q["verdict"]) == (94.0, 95.0, "undecided")
    assert (q["top1_ci_low_pct"], q["top1_ci_high_pct"], q["eval_images"]) == (85.5, 97.6, 72)


def test_each_sentence_says_whether_it_paid_and_why_not() -> None:
    rows = {r["variant"]: r for r in compression.table(RECORDS, BENCH)}
    paid = compression.sentence(rows["openvino_int8"], 32, PROFILE)
    assert "2.10x `openvino_fp32`'s speed at batch 32: it paid" in paid
    assert "the same FLOPs" in paid and "bytes moved -75%" in paid
    not_paid = compression.sentence(rows["openvino_pruned_fp32"], 32, PROFILE)
    assert "FLOPs -46%" in not_paid and "1.05x" in not_paid and "it did not pay" in not_paid
    # why: the profile's memory-bound types, with their shares; convolution is not one of them
    assert "depthwise convolution 35% of the time for 6% of the FLOPs" in not_paid
    assert "batch norm 20% of the time for 1% of the FLOPs" in not_paid
    assert "convolution 40%" not in not_paid
    assert "memory-bound" not in compression.sentence(rows["openvino_pruned_fp32"], 32, None)


def test_the_report_section_renders_the_table_and_stays_out_without_compressions() -> None:
    text = render_markdown(report.compression_section(BENCH, list(RECORDS.values()), PROFILE), None)
    assert "What each compression did" in text
    assert "0.3876 → 0.21" in text and "3373570 → 1900000" in text
    assert "94.0% [85.5, 97.6], n=72" in text  # top-1 with its interval and images
    assert "1.50x" in text and "2.10x" in text
    only_fp32 = [RECORDS["openvino_fp32"]]
    assert report.compression_section(BENCH, only_fp32, PROFILE) == []
    assert report.compression_section(None, list(RECORDS.values()), PROFILE) == []
