"""Stage `report`: REPORT.md and REPORT.html from hand-written pipeline outputs (no training)."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import pytest
from conftest import write_params
from PIL import Image

from stages import report
from stages.config import InputError, compose, path, stage_main
from stages.io import write_csv, write_json

CLASSES = ["Zebra", "Sea turtle", "Blue jay"]
SPLIT_COUNTS = {"train": (6, 5, 4), "val": (2, 2, 1), "test": (3, 2, 2)}
FAILED_ERROR = "RuntimeError: lowering failed | node aten.conv2d\nTraceback (most recent call last)"


def png(file: Path, color: str = "red") -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), color).save(file, "PNG")


def bench_row(variant: str, batch: int, status: str = "ok", **values) -> dict:
    row = {"variant": variant, "backend": "onnxruntime", "precision": "int8", "batch": batch,
           "status": status, "error": None, "throughput": None, "throughput_min": None,
           "throughput_max": None, "latency_p50_ms": None, "latency_mean_ms": None,
           "latency_p90_ms": None, "latency_p99_ms": None, "speedup": None, "top1": None,
           "agreement": None, "accuracy_ok": None, "size_mb": None, "build_seconds": None,
           "peak_rss_mb": None, "cuda_max_allocated_mb": None, "gflops_per_s": None,
           "threads": 2, "device": "cpu"}
    row.update(values)
    return row


BENCHMARK = {
    "protocol": "default", "device": "cpu", "threads": 2, "baseline": "eager_fp32",
    "reference_batch": 32, "best_variant": "onnxruntime_int8", "best_speedup": 11.2,
    "machine": {"cpu": "Intel Xeon Test CPU @ 2.5GHz", "cores": 2, "gpu": None,
                "gpu_driver": None, "python": "3.11.2", "torch": "2.14.1",
                "torchvision": "0.29.0", "onnxruntime": "1.31.1", "torchao": "0.18.0",
                "torch_tensorrt": None, "platform": "Linux-test"},
    "rows": {
        "eager_fp32.b1": bench_row("eager_fp32", 1, throughput=41.7, latency_p50_ms=23.98,
                                   latency_p99_ms=27.5, speedup=1.0, top1=93.75, size_mb=13.4),
        "eager_fp32.b32": bench_row("eager_fp32", 32, throughput=72.5, latency_p50_ms=441.37,
                                    latency_p99_ms=460.02, speedup=1.0, top1=93.75),
        "onnxruntime_int8.b32": bench_row("onnxruntime_int8", 32, throughput=812.3,
                                          latency_p50_ms=39.4, latency_p99_ms=44.81, speedup=11.2,
                                          top1=93.12, size_mb=3.6, build_seconds=12.34),
        "inductor_bf16.b32": bench_row("inductor_bf16", 32, "failed",
                                       error="RuntimeError: bad | kernel\nsecond line"),
        "trt_fp16.b32": bench_row("trt_fp16", 32, "skipped", error="no CUDA device"),
    },
}

OPTIMIZE = {
    "int8": {"variant": "int8", "backend": "aot_inductor", "precision": "int8", "status": "ok",
             "reason": None, "error": None, "artifact": "artifacts/optimized/int8/model.pt2",
             "size_mb": 3.912, "build_seconds": 48.21, "top1": 92.5, "fp32_top1": 93.75,
             "top1_delta": -1.25, "accuracy_bar": 1.5, "accuracy_ok": True, "agreement": 97.5},
    "trt_fp16": {"variant": "trt_fp16", "backend": "torch_tensorrt", "precision": "fp16",
                 "status": "skipped", "reason": "torch_tensorrt not installed", "error": None,
                 "artifact": None, "size_mb": None, "build_seconds": None},
    "inductor_bf16": {"variant": "inductor_bf16", "backend": "aot_inductor", "precision": "bf16",
                      "status": "failed", "reason": None, "error": FAILED_ERROR,
                      "artifact": None, "size_mb": None, "build_seconds": None},
}


def write_inputs(cfg, benchmark: bool = True, optimize: bool = True) -> None:
    """What download, prepare, train, optimize and benchmark write, in their shapes."""
    prepared, metrics, plots = path(cfg, "prepared"), path(cfg, "metrics"), path(cfg, "plots")
    prepared.mkdir(parents=True)
    (prepared / "labels.txt").write_text("".join(f"{c}\n" for c in CLASSES))
    prep = {"classes": 3, "skipped_undecodable": 1}
    for split, counts in SPLIT_COUNTS.items():
        rows = [(f"images/{split}{label}{i}.jpg", label, name, f"{split}{label}{i}", "train")
                for label, (name, n) in enumerate(zip(CLASSES, counts, strict=True))
                for i in range(n)]
        write_csv(prepared / f"{split}.csv",
                  ["file", "label", "class", "image_id", "official_split"], rows)
        prep[f"{split}.images"] = sum(counts)
        prep.update({f"{split}.{c}.count": n for c, n in zip(CLASSES, counts, strict=True)})
    prep["test.images"] = 99  # a stale summary: the CSVs must win
    write_json(metrics / "prepare.json", prep)
    lic = "https://creativecommons.org/licenses/by/2.0/"
    write_csv(path(cfg, "raw") / "attribution.csv", ["ImageID", "split", "class", "License"],
              [(f"id{i}", "train", CLASSES[i % 3], lic) for i in range(25)])
    write_json(metrics / "download.json", {"selected": 27, "downloaded": 25, "missing": 1,
                                           "invalid": 1, "failed": 0, "fetch_seconds": 6.96,
                                           "train.images": 25})
    write_json(metrics / "train.json", {
        "best_val_acc": 0.8, "best_epoch": 2, "test_acc": 0.857142, "epochs_run": 3,
        "epochs_configured": 3, "batch_size": 16, "wall_time_s": 12.345,
        "train_images_per_s": 33.21, "test_images": 7,
        **{f"test.{c}.{m}": v for c, v in zip(CLASSES, (1.0, 0.5, 0.75), strict=True)
           for m in ("precision", "recall")}})
    write_csv(plots / "train_history.csv",
              ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "train_images",
               "train_images_per_s", "epoch_seconds"],
              [(e, 1.2 / e, 0.5 + 0.1 * e, 1.3 / e, 0.5 + 0.1 * e, 1e-3, 15, 30.0, 0.5)
               for e in (1, 2, 3)])
    png(plots / "confusion.png")
    if optimize:
        for name, record in OPTIMIZE.items():
            write_json(metrics / "optimize" / f"{name}.json", record)
    if benchmark:
        write_json(metrics / "benchmark.json", BENCHMARK)
        for chart in report.BENCHMARK_CHARTS:
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


def header_of(md: str, row_first_cell: str) -> list[str]:
    """The header of the table holding the row that starts with `row_first_cell`."""
    lines = md.splitlines()
    i = next(i for i, ln in enumerate(lines)
             if ln.startswith("| ") and gfm_cells(ln)[0] == row_first_cell)
    while i > 0 and lines[i - 1].startswith("| "):
        i -= 1
    return gfm_cells(lines[i])


def test_report_tables_hold_the_numbers(cfg) -> None:
    write_inputs(cfg)
    out = report.run(cfg)
    md = (path(cfg, "reports") / "REPORT.md").read_text()
    s = sections(md)
    assert list(s) == ["Dataset", "Training", "Optimization", "Benchmark", "Machine"]

    # Dataset: the CSV rows, not the stale prepare.json figure, and the disagreement noted.
    assert table_row(s["Dataset"], "Zebra") == ["Zebra", "6", "2", "3", "11"]
    assert table_row(s["Dataset"], "all classes") == ["all classes", "15", "5", "7", "27"]
    assert "`prepare.json` says 99 test images, `test.csv` has 7 rows" in s["Dataset"]
    assert "CC BY 4.0" in s["Dataset"] and "CC BY 2.0" in s["Dataset"]
    assert "lists 25 image(s)" in s["Dataset"]
    assert table_row(s["Dataset"], "downloaded") == ["downloaded", "25"]
    assert table_row(s["Dataset"], "fetch_seconds") == ["fetch_seconds", "6.96"]
    assert out["dataset"] == {"classes": 3, "images": {"train": 15, "val": 5, "test": 7},
                              "attribution_rows": 25}

    # Training: metrics, recipe from the config, per-class figures, both charts.
    assert table_row(s["Training"], "test accuracy")[1] == "85.7% on 7 images"
    assert table_row(s["Training"], "best validation accuracy")[1] == "80.0% (epoch 2)"
    assert table_row(s["Training"], "model")[1] == cfg.model.name
    assert f"lr {cfg.train.lr:g}" in table_row(s["Training"], "recipe")[1]
    assert table_row(s["Training"], "Sea turtle") == ["Sea turtle", "50.0%", "50.0%"]
    curves = path(cfg, "reports") / "training_curves.png"
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](training_curves.png)" in s["Training"]
    assert "](../plots/confusion.png)" in s["Training"]

    # Optimization: the ok row's numbers.
    assert table_row(s["Optimization"], "int8")[3:9] == [
        "ok", "3.9", "48.2", "92.50", "-1.25 (bar 1.5, ok)", "97.50"]
    assert "Configured but not run: `cpu_bf16`" in s["Optimization"]

    # Benchmark: rows, the winner sentence and the charts.
    row = table_row(s["Benchmark"], "onnxruntime_int8")
    assert row[:10] == ["onnxruntime_int8", "ok", "32", "812.3", "39.40", "44.81", "11.20×",
                        "93.12", "3.6", "12.3"]
    assert ("At batch 32, **onnxruntime_int8** was fastest: 11.2× the throughput of "
            "`eager_fp32` (812.3 images/s, top-1 93.12%).") in s["Benchmark"]
    for chart in report.BENCHMARK_CHARTS:
        assert f"](../plots/{chart})" in s["Benchmark"]
    assert table_row(s["Machine"], "cpu")[1] == "Intel Xeon Test CPU @ 2.5GHz"
    assert table_row(s["Machine"], "torch_tensorrt")[1] == "—"
    assert out["benchmark"]["best_variant"] == "onnxruntime_int8"

    # Every linked image exists where the Markdown says.
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (path(cfg, "reports") / link).is_file(), link


def test_skipped_and_failed_rows_keep_their_reason_and_a_valid_table(cfg) -> None:
    write_inputs(cfg)
    report.run(cfg)
    s = sections((path(cfg, "reports") / "REPORT.md").read_text())
    opt = s["Optimization"]
    header = header_of(opt, "int8")
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
    # training curves, confusion matrix, three benchmark charts
    assert len(srcs) == 5
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    for s in srcs:
        with Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))) as im:
            assert im.format == "PNG"
    assert "<link" not in page and "<script" not in page
    # Same content as the Markdown: numbers, escaped error text, the winner in bold.
    assert "<td class=num>812.3</td>" in page
    assert "RuntimeError: lowering failed | node aten.conv2d" in page
    assert "<strong>onnxruntime_int8</strong>" in page
    assert '<tr class="failed">' in page and '<tr class="skipped">' in page


def test_absent_benchmark_and_optimize_say_not_run(cfg) -> None:
    write_inputs(cfg, benchmark=False, optimize=False)
    out = report.run(cfg)
    s = sections((path(cfg, "reports") / "REPORT.md").read_text())
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
    assert stage_main("report", report.run, ["--params", str(params)]) == 2  # no train.json
    write_inputs(cfg, benchmark=False)
    assert stage_main("report", report.run, ["--params", str(params)]) == 0
    assert (path(cfg, "reports") / "REPORT.html").is_file()


@pytest.mark.parametrize("text", ["a|b", "a\\|b", "ends with \\", "two\nlines | x"])
def test_md_cell_keeps_one_cell(text) -> None:
    cells = gfm_cells(f"| {report.md_cell(text)} | next |")
    assert cells == [" ".join(text.split()), "next"]
