"""Stage `report`: REPORT.md and REPORT.html from hand-written pipeline outputs (no training)."""

from __future__ import annotations

import base64
import copy
import io
import re
from importlib import metadata
from pathlib import Path

import pytest
from conftest import write_params
from PIL import Image

from oipipe.core import cli
from oipipe.core.config import compose, path
from oipipe.core.errors import InputError
from oipipe.core.files import write_csv, write_json
from oipipe.reporting import document
from stages import report

CLASSES = ["Zebra", "Sea turtle", "Blue jay"]
SPLIT_COUNTS = {"train": (6, 5, 4), "val": (2, 2, 1), "test": (3, 2, 2)}
# What the download stage fetched per official Open Images split (prepare re-splits it).
OFFICIAL_COUNTS = {"train": (5, 4, 4), "validation": (2, 1, 2), "test": (3, 2, 2)}
FETCH = {
    "selected": 28,
    "downloaded": 25,
    "missing": 1,
    "invalid": 1,
    "failed": 1,
    "multiclass_images": 3,
    "multiclass_dropped": 2,
    "empty_classes": 0,
    "cross_split_duplicates": 0,
    "no_attribution": 0,
    "images_requested": 26,
    "fetch_seconds": 6.96,
    "fetch_images_per_s": 3.736,
    "label_rows": 103,
    "malformed_rows": 1,
    "bad_image_ids": 0,
    "http_retries": 4,
}
# What the download stage imported from a photo folder (data.source=folder): no official splits.
FOLDER_COUNTS = {"all": (12, 7, 5)}
IMPORT = {
    "found": 29,
    "imported": 24,
    "undecodable": 2,
    "not_an_image": 1,
    "duplicates": 2,
    "empty_classes": 0,
    "import_seconds": 1.131,
}
FAILED_ERROR = "RuntimeError: lowering failed | node aten.conv2d\nTraceback (most recent call last)"


def png(file: Path, color: str = "red") -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), color).save(file, "PNG")


def bench_row(variant: str, batch: int, status: str = "ok", **values) -> dict:
    row = {
        "variant": variant,
        "backend": "onnxruntime",
        "precision": "int8",
        "batch": batch,
        "status": status,
        "error": None,
        "throughput": None,
        "throughput_min": None,
        "throughput_max": None,
        "latency_p50_ms": None,
        "latency_mean_ms": None,
        "latency_p90_ms": None,
        "latency_p99_ms": None,
        "speedup": None,
        "top1_pct": None,
        "top1_ci_low_pct": None,
        "top1_ci_high_pct": None,
        "eval_images": None,
        "agreement_pct": None,
        "verdict": None,
        "size_mb": None,
        "build_seconds": None,
        "peak_rss_mb": None,
        "cuda_max_allocated_mb": None,
        "gflops_per_s": None,
        "threads": 2,
        "device": "cpu",
    }
    row.update(values)
    return row


# Accuracy on the 12 val + test images, with Wilson intervals (oipipe.measure.intervals.wilson).
def acc(top1: float, low: float, high: float) -> dict:
    return {"top1_pct": top1, "top1_ci_low_pct": low, "top1_ci_high_pct": high, "eval_images": 12}


FP32_ACC = acc(91.667, 64.612, 98.513)
INT8_ACC = acc(83.333, 55.197, 95.303)
ORT_FP32_ACC = acc(41.667, 19.326, 68.049)
WINNER_32 = {
    "variant": "onnxruntime_int8",
    "verdict": "pass",
    "batch": 32,
    "throughput": 812.3,
    "latency_p99_ms": 44.81,
    "speedup": 11.2,
    **FP32_ACC,
}
WINNER_1 = {
    "variant": "inductor_int8",
    "verdict": "undecided",
    "batch": 1,
    "throughput": 95.2,
    "latency_p99_ms": 12.5,
    "speedup": 2.28,
    **INT8_ACC,
}

BENCHMARK = {
    "protocol": "default",
    "device": "cpu",
    "threads": 2,
    "threads_reason": "2: benchmark.threads",
    "baseline": "eager_fp32",
    "baselines": {"1": "eager_fp32", "32": "eager_fp32"},
    "load_before": [0.5, 0.4, 0.3],
    "load_after": [1.25, 0.9, 0.5],
    "tie_margin_pct": 5,
    "reference_batch": 32,
    "best_variant": "onnxruntime_int8",
    "best_speedup": 11.2,
    "best_verdict": "pass",
    "winners": {"1": WINNER_1, "32": WINNER_32, "64": {"variant": None}},
    "machine": {
        "cpu": "Intel Xeon Test CPU @ 2.5GHz",
        "cores": 2,
        "native_bf16": False,
        "cpu_flags_relevant": ["avx512_vnni", "avx512f"],
        "gpu": None,
        "gpu_driver": None,
        "python": "3.11.2",
        "torch": "2.14.1",
        "torchvision": "0.29.0",
        "onnxruntime": "1.31.1",
        "torchao": "0.18.0",
        "torch_tensorrt": None,
        "platform": "Linux-test",
    },
    "rows": {
        "eager_fp32.b1": bench_row(
            "eager_fp32",
            1,
            throughput=41.7,
            latency_p50_ms=23.98,
            latency_p99_ms=27.5,
            speedup=1.0,
            size_mb=13.4,
            verdict="pass",
            **FP32_ACC,
        ),
        "eager_fp32_nchw.b1": bench_row(
            "eager_fp32_nchw",
            1,
            throughput=33.36,
            latency_p50_ms=29.98,
            latency_p99_ms=33.0,
            speedup=0.8,
            verdict="pass",
            **FP32_ACC,
        ),
        "inductor_int8.b1": bench_row(
            "inductor_int8",
            1,
            throughput=95.2,
            latency_p50_ms=10.5,
            latency_p99_ms=12.5,
            speedup=2.28,
            verdict="undecided",
            **INT8_ACC,
        ),
        "eager_fp32.b32": bench_row(
            "eager_fp32",
            32,
            throughput=72.5,
            latency_p50_ms=441.37,
            latency_p99_ms=460.02,
            speedup=1.0,
            verdict="pass",
            **FP32_ACC,
        ),
        "eager_fp32_nchw.b32": bench_row(
            "eager_fp32_nchw",
            32,
            throughput=58.0,
            latency_p50_ms=551.7,
            latency_p99_ms=570.1,
            speedup=0.8,
            verdict="pass",
            **FP32_ACC,
        ),
        "onnxruntime_int8.b32": bench_row(
            "onnxruntime_int8",
            32,
            throughput=812.3,
            latency_p50_ms=39.4,
            latency_p99_ms=44.81,
            speedup=11.2,
            size_mb=3.6,
            build_seconds=12.34,
            verdict="pass",
            **FP32_ACC,
        ),
        # Faster than the winner, but outside its accuracy bar: never the winner.
        "onnxruntime_fp32.b32": bench_row(
            "onnxruntime_fp32",
            32,
            throughput=900.0,
            latency_p50_ms=35.6,
            latency_p99_ms=40.0,
            speedup=12.41,
            verdict="fail",
            **ORT_FP32_ACC,
        ),
        "inductor_bf16.b32": bench_row(
            "inductor_bf16", 32, "failed", error="RuntimeError: bad | kernel\nsecond line"
        ),
        "trt_fp16.b32": bench_row("trt_fp16", 32, "skipped", error="no CUDA device"),
        "eager_fp32.b64": bench_row("eager_fp32", 64, "failed", error="out of memory"),
    },
}

# What the benchmark draws, the speed-accuracy Pareto chart among them.
BENCHMARK_CHARTS = (
    "benchmark_throughput.png",
    "benchmark_latency.png",
    "benchmark_speedup.png",
    "pareto.png",
)

PAIRED_12 = {"eval_splits": ["val", "test"], "eval_images": 12, "fp32_top1_pct": 91.667}
OPTIMIZE = {
    "inductor_int8": {
        "variant": "inductor_int8",
        "backend": "aot_inductor",
        "precision": "int8",
        "status": "ok",
        "reason": None,
        "error": None,
        "artifact": "artifacts/optimized/inductor_int8/model.pt2",
        "size_mb": 3.912,
        "build_seconds": 48.21,
        **PAIRED_12,
        **INT8_ACC,
        "top1_delta_pct": -8.333,
        "top1_delta_ci_low_pct": -35.437,
        "top1_delta_ci_high_pct": 18.135,
        "discordant_worse": 1,
        "discordant_better": 0,
        "mcnemar_p": 1.0,
        "agreement_pct": 91.667,
        "agreement_ci_low_pct": 64.612,
        "agreement_ci_high_pct": 98.513,
        "accuracy_bar_pct": 1.5,
        "verdict": "undecided",
        "verdict_reason": "too few images to tell whether it is within the 1.5-point bar: "
        "-8.3 points, 95% interval [-35.4, +18.1] on 12 images (1 worse, "
        "0 better); about 79 images at these rates would decide it",
        "images_to_decide": 79,
    },
    "onnxruntime_int8": {
        "variant": "onnxruntime_int8",
        "backend": "onnxruntime",
        "precision": "int8",
        "status": "ok",
        "reason": None,
        "error": None,
        "size_mb": 3.6,
        "build_seconds": 12.34,
        **PAIRED_12,
        **FP32_ACC,
        "top1_delta_pct": 0.0,
        "top1_delta_ci_low_pct": -24.707,
        "top1_delta_ci_high_pct": 24.707,
        "discordant_worse": 0,
        "discordant_better": 0,
        "mcnemar_p": 1.0,
        "agreement_pct": 100.0,
        "agreement_ci_low_pct": 75.751,
        "agreement_ci_high_pct": 100.0,
        "accuracy_bar_pct": 1.5,
        "verdict": "pass",
        "verdict_reason": "as good as fp32 or better on these images: +0.0 points, 95% interval "
        "[-24.7, +24.7] on 12 images (0 worse, 0 better)",
        "images_to_decide": None,
    },
    "onnxruntime_fp32": {
        "variant": "onnxruntime_fp32",
        "backend": "onnxruntime",
        "precision": "fp32",
        "status": "ok",
        "reason": None,
        "error": None,
        "size_mb": 13.4,
        "build_seconds": 2.1,
        **PAIRED_12,
        **ORT_FP32_ACC,
        "top1_delta_pct": -50.0,
        "top1_delta_ci_low_pct": -73.366,
        "top1_delta_ci_high_pct": -12.211,
        "discordant_worse": 6,
        "discordant_better": 0,
        "mcnemar_p": 0.0313,
        "agreement_pct": 50.0,
        "agreement_ci_low_pct": 25.378,
        "agreement_ci_high_pct": 74.622,
        "accuracy_bar_pct": 0.5,
        "verdict": "fail",
        "verdict_reason": "worse than fp32 by more than the 0.5-point bar with confidence: "
        "-50.0 points, 95% interval [-73.4, -12.2] on 12 images (6 worse, "
        "0 better)",
        "images_to_decide": None,
    },
    "trt_fp16": {
        "variant": "trt_fp16",
        "backend": "torch_tensorrt",
        "precision": "fp16",
        "status": "skipped",
        "reason": "torch_tensorrt not installed",
        "error": None,
        "artifact": None,
        "size_mb": None,
        "build_seconds": None,
    },
    "inductor_bf16": {
        "variant": "inductor_bf16",
        "backend": "aot_inductor",
        "precision": "bf16",
        "status": "failed",
        "reason": None,
        "error": FAILED_ERROR,
        "artifact": None,
        "size_mb": None,
        "build_seconds": None,
    },
}


def download_metrics(classes: list[str], source: str) -> dict:
    """download.json as the download stage lays it out: per official split and `all` (a photo
    folder: `all` only), the images, each class's count and share, then the fetch figures."""
    table = {**OFFICIAL_COUNTS, "all": tuple(map(sum, zip(*OFFICIAL_COUNTS.values(), strict=True)))}
    if source == "folder":
        table = FOLDER_COUNTS
    metrics = {}
    for split, counts in table.items():
        metrics[f"{split}.images"] = sum(counts)
        for c, n in zip(classes, counts, strict=True):
            metrics.update(
                {f"{split}.{c}.count": n, f"{split}.{c}.share_pct": round(100 * n / sum(counts), 2)}
            )
    return {**metrics, **(IMPORT if source == "folder" else FETCH)}


def write_inputs(
    cfg, benchmark: bool = True, optimize: bool = True, classes: list[str] = CLASSES
) -> None:
    """What download, prepare, train, optimize and benchmark write, in their shapes."""
    prepared, metrics, plots = path(cfg, "prepared"), path(cfg, "metrics"), path(cfg, "plots")
    prepared.mkdir(parents=True)
    (prepared / "labels.txt").write_text("".join(f"{c}\n" for c in classes))
    prep = {"classes": 3, "skipped_undecodable": 1}
    for split, counts in SPLIT_COUNTS.items():
        rows = [
            (f"images/{split}{label}{i}.jpg", label, name, f"{split}{label}{i}", "train")
            for label, (name, n) in enumerate(zip(classes, counts, strict=True))
            for i in range(n)
        ]
        write_csv(
            prepared / f"{split}.csv",
            ["file", "label", "class", "image_id", "official_split"],
            rows,
        )
        prep[f"{split}.images"] = sum(counts)
        prep.update({f"{split}.{c}.count": n for c, n in zip(classes, counts, strict=True)})
    prep["test.images"] = 99  # a stale summary: the CSVs must win
    write_json(metrics / "prepare.json", prep)
    lic = "https://creativecommons.org/licenses/by/2.0/"
    write_csv(
        path(cfg, "raw") / "attribution.csv",
        ["ImageID", "split", "class", "License"],
        [(f"id{i}", "train", classes[i % 3], lic) for i in range(25)],
    )
    write_json(metrics / "download.json", download_metrics(classes, cfg.data.source))
    write_json(
        metrics / "train.json",
        {
            "best_val_acc_pct": 80.0,
            "val_acc_ci_low_pct": 37.553,
            "val_acc_ci_high_pct": 96.378,
            "precision": "bf16",
            "precision_chosen_by": "measured",
            "val_images": 5,
            "best_val_loss": 0.61234,
            "selected_by": "val_loss",
            "best_epoch": 2,
            "test_acc_pct": 85.7142,
            "test_acc_ci_low_pct": 48.687,
            "test_acc_ci_high_pct": 97.432,
            "test_images": 7,
            "epochs_run": 3,
            "epochs_configured": 3,
            "batch_size": 16,
            "wall_time_s": 12.345,
            "train_images_per_s": 33.21,
            # 6 of the 7 test images right: one Sea turtle taken for a Blue jay.
            **{
                f"test.{c}.precision_pct": v
                for c, v in zip(classes, (100, 100, 66.67), strict=True)
            },
            **{f"test.{c}.recall_pct": v for c, v in zip(classes, (100, 50, 100), strict=True)},
        },
    )
    write_csv(
        plots / "train_history.csv",
        [
            "epoch",
            "train_loss",
            "train_acc_pct",
            "val_loss",
            "val_acc_pct",
            "lr",
            "train_images",
            "train_images_per_s",
            "epoch_seconds",
        ],
        [(e, 1.2 / e, 50 + 10 * e, 1.3 / e, 50 + 10 * e, 1e-3, 15, 30.0, 0.5) for e in (1, 2, 3)],
    )
    png(plots / "confusion.png")
    if optimize:
        for name, record in OPTIMIZE.items():
            write_json(metrics / "optimize" / f"{name}.json", record)
    if benchmark:
        write_json(metrics / "benchmark.json", BENCHMARK)
        for chart in BENCHMARK_CHARTS:
            png(plots / chart, "blue")


@pytest.fixture
def cfg(tmp_path):
    return compose([f"paths.root={tmp_path}", "tracking.enabled=false", "data=mirror"])


def sections(md: str) -> dict[str, str]:
    """Level-2 sections of the Markdown by title."""
    parts = re.split(r"^## (.+)$", md, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def gfm_cells(line: str) -> list[str]:
    """Split a table row the way GFM does: a backslash escapes the next character."""
    cells, cur, chars = [], "", iter(line.strip().removeprefix("|").removesuffix("|"))
    for ch in chars:
        if ch == "\\":
            cur += next(chars, "")
        elif ch == "|":
            cells.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return [*cells, cur.strip()]


def table_row(md: str, first_cell: str) -> list[str]:
    rows = [gfm_cells(ln) for ln in md.splitlines() if ln.startswith("| ")]
    return next(r for r in rows if r[0] == first_cell)


def bench_table_row(md: str, variant: str, batch: str) -> list[str]:
    rows = [gfm_cells(ln) for ln in md.splitlines() if ln.startswith("| ")]
    return next(r for r in rows if r[0] == variant and r[2] == batch)


def header_of(md: str, row_first_cell: str) -> list[str]:
    """The header of the table holding the row that starts with `row_first_cell`."""
    lines = md.splitlines()
    i = next(
        i
        for i, ln in enumerate(lines)
        if ln.startswith("| ") and gfm_cells(ln)[0] == row_first_cell
    )
    while i > 0 and lines[i - 1].startswith("| "):
        i -= 1
    return gfm_cells(lines[i])


def test_report_tables_hold_the_numbers(cfg) -> None:
    write_inputs(cfg)
    out = report.run(cfg)
    md = (path(cfg, "reports") / "REPORT.md").read_text()
    s = sections(md)
    assert list(s) == [
        "Dataset",
        "Training",
        "Optimization",
        "Benchmark",
        "What each compression did",
        "Where the time goes",
        "Machine",
    ]
    assert "**Not run.**" in s["Where the time goes"]  # no profile.json in these inputs
    # onnxruntime_int8 against its twin onnxruntime_fp32, from these records and rows
    assert "`onnxruntime_int8` (post-training int8 (QDQ))" in s["What each compression did"]
    assert "`onnxruntime_fp32`'s speed at batch 32" in s["What each compression did"]
    version = metadata.version("oi-pipeline")
    assert f"Written by oi-pipeline {version} (code commit " in s["Machine"]
    assert out["version"] == version

    # Dataset: the CSV rows, not the stale prepare.json figure, and the disagreement noted.
    assert table_row(s["Dataset"], "Zebra") == ["Zebra", "6", "2", "3", "11"]
    assert table_row(s["Dataset"], "all classes") == ["all classes", "15", "5", "7", "27"]
    assert "`prepare.json` says 99 test images, `test.csv` has 7 rows" in s["Dataset"]
    assert "CC BY 4.0" in s["Dataset"] and "CC BY 2.0" in s["Dataset"]
    assert "lists 25 image(s)" in s["Dataset"]
    assert out["dataset"] == {
        "classes": 3,
        "images": {"train": 15, "val": 5, "test": 7},
        "attribution_rows": 25,
    }

    # Training: accuracies with interval and n, what chose the checkpoint, recipe from the
    # config, per-class figures (recall is an accuracy: its images and interval), both charts.
    assert table_row(s["Training"], "test accuracy")[1] == "85.7% [48.7, 97.4], n=7"
    assert (
        table_row(s["Training"], "validation accuracy at that epoch")[1]
        == "80.0% [37.6, 96.4], n=5 (epoch 2)"
    )
    assert (
        table_row(s["Training"], "checkpoint selected by")[1]
        == "lowest validation loss (val_loss): 0.6123, epoch 2"
    )
    assert table_row(s["Training"], "model")[1] == cfg.model.name
    assert f"lr {cfg.train.lr:g}" in table_row(s["Training"], "recipe")[1]
    # the precision training ran in, and how `auto` chose it
    assert table_row(s["Training"], "recipe")[1].endswith("precision bf16 (auto: measured)")
    assert table_row(s["Training"], "Sea turtle") == [
        "Sea turtle",
        "2",
        "100.0%",
        "50.0% [9.5, 90.5], n=2",
    ]
    curves = path(cfg, "reports") / "training_curves.png"
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](training_curves.png)" in s["Training"]
    assert "](../plots/confusion.png)" in s["Training"]

    # Optimization: what the variants were measured on, and each verdict with its evidence.
    opt = s["Optimization"]
    assert (
        "`inductor_int8`, `onnxruntime_fp32`, `onnxruntime_int8` and the fp32 model were "
        "evaluated on the same 12 images of the val + test splits; fp32 top-1 91.7% "
        "[64.6, 98.5], n=12."
    ) in opt
    assert header_of(opt, "inductor_int8")[6:12] == [
        "top-1",
        "Δ top-1 vs fp32 (points)",
        "verdict",
        "agreement",
        "worse / better",
        "McNemar p",
    ]
    assert table_row(opt, "inductor_int8")[3:12] == [
        "ok",
        "3.9",
        "48.2",
        "83.3% [55.2, 95.3], n=12",
        "-8.33 [-35.44, +18.14]",
        "undecided (bar 1.5): about 79 images would decide",
        "91.7% [64.6, 98.5]",
        "1 / 0",
        "1",
    ]
    assert table_row(opt, "onnxruntime_fp32")[6:12] == [
        "41.7% [19.3, 68.0], n=12",
        "-50.00 [-73.37, -12.21]",
        "fail (bar 0.5)",
        "50.0% [25.4, 74.6]",
        "6 / 0",
        "0.031",
    ]
    assert table_row(opt, "onnxruntime_int8")[8] == "pass (bar 1.5)"
    assert "- `onnxruntime_fp32`: **fail**, worse than fp32 by more than the 0.5-point bar" in opt
    assert "- `inductor_int8`: **undecided**, too few images" in opt
    assert "Configured but not run: `eager_bf16`" in opt

    # Benchmark: the baseline named, the NCHW row and the channels_last gain, rows with
    # accuracy and verdict, the winners, and every chart (the Pareto one too).
    bench = s["Benchmark"]
    assert (
        "The baseline at each batch size is the faster eager fp32 layout there under "
        "`torch.inference_mode`, PyTorch's own advice for inference: batch 1 channels_last "
        "eager fp32 (`eager_fp32`), batch 32 channels_last eager fp32 (`eager_fp32`)."
    ) in bench
    assert "with 2 thread(s) (2: benchmark.threads)" in bench
    assert "load average was 0.50 before the timing and 1.25 after" in bench
    assert (
        "Throughput of channels_last (`eager_fp32`) over NCHW: 1.25× at batch 1, 1.25× at batch 32."
    ) in bench
    assert bench_table_row(bench, "eager_fp32_nchw", "32")[3] == "58.0"
    assert bench_table_row(bench, "onnxruntime_int8", "32") == [
        "onnxruntime_int8",
        "ok",
        "32",
        "812.3",
        "39.40",
        "44.81",
        "11.20×",
        "91.7% [64.6, 98.5], n=12",
        "pass",
        "3.6",
        "12.3",
        "",
    ]
    assert bench_table_row(bench, "onnxruntime_fp32", "32")[8] == "fail"
    assert (
        "Winner at each batch size (the fastest variant whose accuracy verdict is not "
        "`fail`): batch 1 **inductor_int8** (undecided), batch 32 **onnxruntime_int8**, "
        "batch 64 none."
    ) in bench
    for chart in BENCHMARK_CHARTS:
        assert f"](../plots/{chart})" in bench
    assert table_row(s["Machine"], "cpu")[1] == "Intel Xeon Test CPU @ 2.5GHz"
    assert table_row(s["Machine"], "cpu_flags_relevant")[1] == "avx512_vnni, avx512f"
    assert table_row(s["Machine"], "torch_tensorrt")[1] == "—"
    assert out["benchmark"]["best_variant"] == "onnxruntime_int8"

    # Every linked image exists where the Markdown says.
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (path(cfg, "reports") / link).is_file(), link


def head(md: str) -> list[str]:
    """The lines between the title and the first section."""
    top = md.split("\n## ", 1)[0].splitlines()
    assert top[0].startswith("# ")
    return [ln for ln in top[1:] if ln.strip()]


def test_first_lines_say_what_to_ship(cfg) -> None:
    write_inputs(cfg)
    out = report.run(cfg)
    lines = head((path(cfg, "reports") / "REPORT.md").read_text())
    # The winner at the reference batch; onnxruntime_fp32 is faster but fails its bar.
    assert lines[0] == (
        "**Ship `onnxruntime_int8` at batch 32**: 812.3 images/s, p99 latency 44.81 ms, top-1 "
        "91.7% [64.6, 98.5], n=12; 11.2× the throughput of channels_last eager fp32 "
        "(`eager_fp32`) at batch 32."
    )
    # Then every other batch size, its undecided winner labelled as such.
    assert lines[1] == (
        "- At batch 1: `inductor_int8` (accuracy undecided), 95.2 images/s, p99 latency 12.50 ms, "
        "top-1 83.3% [55.2, 95.3], n=12; 2.3× the throughput of channels_last eager fp32 "
        "(`eager_fp32`) at batch 1; about 79 images at the same rates would decide its accuracy "
        "(it was measured on 12)."
    )
    assert lines[2] == "- At batch 64: no variant finished."
    assert lines[3] == (
        "- Trained model: test accuracy 85.7% [48.7, 97.4], n=7; validation "
        "80.0% [37.6, 96.4], n=5 at the checkpoint selected by `val_loss`."
    )
    assert lines[4] == (
        "- 3 of 5 optimized variant(s) built; accuracy verdicts: 1 pass, 1 fail, 1 undecided."
    )
    assert out["ship"]["variant"] == "onnxruntime_int8" and out["ship"]["batch"] == 32


def _undecided_at_reference(b: dict) -> None:
    b["reference_batch"] = 1


def _baseline_wins(b: dict) -> None:
    b["winners"]["32"] = {
        **WINNER_32,
        "variant": "eager_fp32",
        "throughput": 72.5,
        "latency_p99_ms": 460.02,
        "speedup": 1.0,
    }


def _tie_and_nchw_baseline(b: dict) -> None:
    b["baselines"]["32"] = "eager_fp32_nchw"
    b["winners"]["32"] = {**WINNER_32, "tied_with": ["openvino_int8", "inductor_fp32"]}


def _nothing_finished(b: dict) -> None:
    b["winners"]["32"] = {"variant": None}


def _no_winners(b: dict) -> None:
    del b["winners"]


@pytest.mark.parametrize(
    "change, first_line",
    [
        (
            _undecided_at_reference,
            "**Ship `inductor_int8` (accuracy undecided) at batch 1**: 95.2 images/s, p99 latency "
            "12.50 ms, top-1 83.3% [55.2, 95.3], n=12; 2.3× the throughput of channels_last "
            "eager fp32 (`eager_fp32`) at batch 1; about 79 images at the same rates would decide "
            "its accuracy (it was measured on 12).",
        ),
        (
            _baseline_wins,
            "**Ship `eager_fp32` at batch 32**: 72.5 images/s, p99 latency 460.02 ms, top-1 91.7% "
            "[64.6, 98.5], n=12; no variant that holds its accuracy beat the baseline, "
            "channels_last eager fp32 (`eager_fp32`).",
        ),
        (
            _tie_and_nchw_baseline,
            "**Ship `onnxruntime_int8` at batch 32**: 812.3 images/s, p99 latency 44.81 ms, top-1 "
            "91.7% [64.6, 98.5], n=12; 11.2× the throughput of NCHW eager fp32 "
            "(`eager_fp32_nchw`) at batch 32; its speed ties with `openvino_int8`, "
            "`inductor_fp32` (their per-round speeds are not told apart, or are within 5%), so it "
            "is chosen for its verdict, then its top-1, then its size.",
        ),
        (
            _nothing_finished,
            "**Nothing to ship at batch 32**: no variant finished there (see Benchmark for the "
            "errors).",
        ),
        (
            _no_winners,
            "**No winner recorded.** `metrics/benchmark.json` has no `winners` (an older benchmark "
            "wrote it): rerun the benchmark (`dvc repro -f benchmark`).",
        ),
    ],
)
def test_ship_line_for_each_kind_of_winner(cfg, change, first_line) -> None:
    write_inputs(cfg)
    bench = copy.deepcopy(BENCHMARK)
    change(bench)
    write_json(path(cfg, "metrics") / "benchmark.json", bench)
    report.run(cfg)
    assert head((path(cfg, "reports") / "REPORT.md").read_text())[0] == first_line


ACCURACY = r"\d+\.\d% \[\d+\.\d, \d+\.\d\], n=\d+"


def test_every_accuracy_carries_its_images_and_interval(cfg) -> None:
    write_inputs(cfg)
    report.run(cfg)
    md = (path(cfg, "reports") / "REPORT.md").read_text()
    said = [md[m.end() :] for m in re.finditer(r"(top-1|accuracy|validation) (?=\d)", md)]
    assert len(said) >= 5  # ship line, batch 1, training summary (2), fp32 on the eval images
    assert all(re.match(ACCURACY, text) for text in said), said
    s = sections(md)
    for section, column in (
        ("Optimization", "top-1"),
        ("Benchmark", "top-1"),
        ("Training", "recall"),
    ):
        lines = [gfm_cells(ln) for ln in s[section].splitlines() if ln.startswith("| ")]
        tables = [i for i, cells in enumerate(lines) if column in cells]
        assert tables, (section, column)
        col = lines[tables[0]].index(column)
        cells = [r[col] for r in lines[tables[0] + 2 :] if len(r) > col]
        assert any(c != "—" for c in cells)
        assert all(c == "—" or re.fullmatch(ACCURACY, c) for c in cells), cells
    for label in ("test accuracy", "validation accuracy at that epoch"):
        assert re.match(ACCURACY, table_row(s["Training"], label)[1])


def test_accuracy_format() -> None:
    assert report.accuracy_text(91.667, 64.612, 98.513, 12) == "91.7% [64.6, 98.5], n=12"
    # A record without the interval gets the Wilson one from its count (the stages' method).
    assert report.accuracy_text(91.667, n=12) == "91.7% [64.6, 98.5], n=12"
    assert report.accuracy_text(97.5, 94.6, 98.9) == "97.5% [94.6, 98.9]"
    assert report.accuracy_text(None, 1, 2, 3) == "—"
    assert report.points(-1.25, -3.1, 0.4) == "-1.25 [-3.10, +0.40]"
    assert [report.p_value(p) for p in (1.0, 0.0313, 0.0004, None)] == ["1", "0.031", "<0.001", "—"]


def test_skipped_and_failed_rows_keep_their_reason_and_a_valid_table(cfg) -> None:
    write_inputs(cfg)
    report.run(cfg)
    s = sections((path(cfg, "reports") / "REPORT.md").read_text())
    opt = s["Optimization"]
    header = header_of(opt, "inductor_int8")
    skipped = table_row(opt, "trt_fp16")
    assert skipped[3] == "skipped" and skipped[-1] == "torch_tensorrt not installed"
    failed = table_row(opt, "inductor_bf16")
    # The `|` in the error is escaped: same number of cells as the header, error intact.
    assert len(failed) == len(header)
    assert failed[3] == "failed"
    assert failed[-1] == "RuntimeError: lowering failed | node aten.conv2d"
    assert "Traceback" not in opt  # first line only

    bench = s["Benchmark"]
    failed = table_row(bench, "inductor_bf16")
    assert len(failed) == len(header_of(bench, "inductor_bf16"))
    assert failed[1] == "failed" and failed[-1] == "RuntimeError: bad | kernel"
    assert failed[3] == "—"  # no throughput for a failed row
    assert table_row(bench, "trt_fp16")[-1] == "no CUDA device"


def test_html_is_self_contained_with_inline_charts(cfg) -> None:
    write_inputs(cfg)
    report.run(cfg)
    page = (path(cfg, "reports") / "REPORT.html").read_text()
    srcs = re.findall(r'src="([^"]*)"', page)
    # training curves, confusion matrix, three benchmark charts and the Pareto chart
    assert len(srcs) == 6
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    for s in srcs:
        with Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))) as im:
            assert im.format == "PNG"
    assert "<link" not in page and "<script" not in page
    # Same content as the Markdown: numbers, escaped error text, the winner in bold.
    assert "<td class=num>812.3</td>" in page
    assert "RuntimeError: lowering failed | node aten.conv2d" in page
    assert "<strong>onnxruntime_int8</strong>" in page
    assert "<strong>Ship <code>onnxruntime_int8</code> at batch 32</strong>" in page
    assert '<tr class="failed">' in page and '<tr class="skipped">' in page


def test_absent_benchmark_and_optimize_say_not_run(cfg) -> None:
    write_inputs(cfg, benchmark=False, optimize=False)
    out = report.run(cfg)
    md = (path(cfg, "reports") / "REPORT.md").read_text()
    s = sections(md)
    assert head(md)[0] == (
        "**Nothing to ship yet.** No `metrics/benchmark.json`: run the "
        "benchmark stage (`dvc repro benchmark`; it builds the optimized "
        "variants first)."
    )
    assert out["ship"] is None
    assert "**Not run.**" in s["Benchmark"] and "dvc repro benchmark" in s["Benchmark"]
    assert "**Not run.**" in s["Optimization"] and "dvc repro optimize" in s["Optimization"]
    assert "|" not in s["Benchmark"]
    # The machine facts are gathered live instead.
    assert "describe the machine that wrote this report" in s["Machine"]
    assert table_row(s["Machine"], "python")[1] == out["machine"]["python"]
    assert out["benchmark"] is None and out["optimize"]["variants"] == {}


def test_missing_train_metrics_is_an_input_error(cfg) -> None:
    with pytest.raises(InputError, match=r"train\.json not found: run the train stage"):
        report.run(cfg)
    assert not (path(cfg, "reports") / "REPORT.md").exists()


def test_entry_point_exit_codes(cfg, tmp_path) -> None:
    params = write_params(cfg, tmp_path / "params.yaml")
    # no train.json
    assert cli.run_stage("report", report.run, ["--params", str(params)]) == 2
    write_inputs(cfg, benchmark=False)
    assert cli.run_stage("report", report.run, ["--params", str(params)]) == 0
    assert (path(cfg, "reports") / "REPORT.html").is_file()


@pytest.mark.parametrize("text", ["a|b", "a\\|b", "ends with \\", "two\nlines | x"])
def test_md_cell_keeps_one_cell(text) -> None:
    cells = gfm_cells(f"| {document.md_cell(text)} | next |")
    assert cells == [" ".join(text.split()), "next"]


def test_a_photo_folder_is_named_as_the_source_not_open_images(tmp_path) -> None:
    cfg = compose(
        [
            f"paths.root={tmp_path}",
            "tracking.enabled=false",
            "data=realdata",
            "data.folder=my/photos",
        ]
    )
    write_inputs(cfg)
    out = report.run(cfg)
    md = (path(cfg, "reports") / "REPORT.md").read_text()
    assert out["title"].endswith("classes of the photo folder my/photos")
    source = sections(md)["Dataset"].split("### Source and licences", 1)[1]
    assert "`my/photos`" in source and "Open Images" not in source


def test_profile_section_shows_the_paragraph_and_a_table_per_mode(cfg) -> None:
    write_inputs(cfg)
    paragraph = "eager at batch 32 (9.00 ms per call): memory-bound: depthwise convolution: 31%."
    types = {
        "depthwise convolution": {
            "time_ms": 2.79,
            "time_share_pct": 31.0,
            "flop_share_pct": 4.0,
            "gflops_per_s": 2.1,
            "intensity": 3.0,
        },
        "convolution": {
            "time_ms": 6.21,
            "time_share_pct": 69.0,
            "flop_share_pct": 96.0,
            "gflops_per_s": 80.0,
            "intensity": None,
        },
    }
    write_json(
        path(cfg, "metrics") / "profile.json",
        {
            "threads": 2,
            "paragraph": paragraph,
            "profiles": {
                "eager@b32": {"mode": "eager", "batch": 32, "total_ms": 9.0, "types": types}
            },
        },
    )
    s = sections((report.run(cfg), (path(cfg, "reports") / "REPORT.md").read_text())[1])
    section = s["Where the time goes"]
    assert paragraph in section and "eager at batch 32: 9.00 ms per call" in section
    assert table_row(section, "depthwise convolution") == [
        "depthwise convolution",
        "31.0%",
        "4.0%",
        "2.790",
        "2.1",
        "3.0",
    ]
    assert table_row(section, "convolution")[-1] == document.DASH


def download_part(md: str) -> str:
    return sections(md)["Dataset"].split("### Download", 1)[1]


def test_download_is_one_table_of_official_splits_and_one_line_of_fetch_figures(cfg) -> None:
    write_inputs(cfg)
    report.run(cfg)
    md = (path(cfg, "reports") / "REPORT.md").read_text()
    part = download_part(md)
    # Counts per class and official split, as download.json has them (not prepare's re-split).
    assert header_of(part, "Zebra") == ["class", "train", "validation", "test", "total"]
    assert table_row(part, "Zebra") == ["Zebra", "5", "2", "3", "10"]
    assert table_row(part, "Sea turtle") == ["Sea turtle", "4", "1", "2", "7"]
    assert table_row(part, "all classes") == ["all classes", "13", "5", "7", "25"]
    assert len([ln for ln in part.splitlines() if ln.startswith("| ")]) == 2 + 4  # one table
    assert (
        "**Fetch:** 28 selected, 25 downloaded, 1 missing, 1 invalid, 1 failed, 4 HTTP "
        "retries; 26 requested in 6.96 s, 3.7 images/s (each image left out is listed in "
        "`data/raw/missing.csv`)."
    ) in part
    # The raw keys stay in the JSON, out of the report.
    assert "share_pct" not in part and "train.images" not in md and "http_retries" not in md
    page = (path(cfg, "reports") / "REPORT.html").read_text()
    assert (
        "<tr><td>Zebra</td><td class=num>5</td><td class=num>2</td><td class=num>3</td>"
        "<td class=num>10</td></tr>"
    ) in page
    assert "<strong>Fetch:</strong> 28 selected, 25 downloaded" in page


def test_download_of_a_photo_folder_says_what_was_imported(tmp_path) -> None:
    cfg = compose(
        [
            f"paths.root={tmp_path}",
            "tracking.enabled=false",
            "data=realdata",
            "data.folder=my/photos",
        ]
    )
    write_inputs(cfg)
    report.run(cfg)
    part = download_part((path(cfg, "reports") / "REPORT.md").read_text())
    assert header_of(part, "Zebra") == ["class", "images"]
    assert [table_row(part, c)[1] for c in (*CLASSES, "all classes")] == ["12", "7", "5", "24"]
    assert (
        "**Import:** 29 files found, 24 imported, 2 undecodable, 1 not an image, 2 "
        "duplicates, in 1.131 s (each file skipped is listed in `data/raw/missing.csv`)."
    ) in part


SCRIPT = "<script>alert(1)</script>"


def test_class_names_are_text_in_html_and_keep_their_markdown_cell(tmp_path) -> None:
    """A class name is data: in HTML it is escaped wherever it appears (table cells, code spans),
    in Markdown a `|` does not split its cell and a `<` opens no tag."""
    cfg = compose([f"paths.root={tmp_path}", "tracking.enabled=false", "data=mirror"])
    classes = [SCRIPT, "a|b", "Blue jay"]
    write_inputs(cfg, classes=classes)
    report.run(cfg)
    md = (path(cfg, "reports") / "REPORT.md").read_text()
    s = sections(md)
    prepared = s["Dataset"].split("### Source", 1)[0]
    assert table_row(prepared, SCRIPT) == [SCRIPT, "6", "2", "3", "11"]
    assert table_row(prepared, "a|b") == ["a|b", "5", "2", "2", "9"]
    assert table_row(download_part(md), "a|b") == ["a|b", "4", "1", "2", "7"]
    assert table_row(s["Training"], "a|b") == ["a|b", "2", "100.0%", "50.0% [9.5, 90.5], n=2"]
    # outside code spans, the Markdown holds the name only with its `<` escaped
    assert not re.search(r"(?<![\\`])<script>", md), md
    assert "| \\<script>alert(1)\\</script> |" in md

    page = (path(cfg, "reports") / "REPORT.html").read_text()
    assert "<script" not in page
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert f"<td>{escaped}</td>" in page and "<td>a|b</td>" in page
    assert f"<code>{escaped}</code>" in page  # the class list, in a paragraph
