"""Progress bars: drawn when stderr is a terminal (a real pseudo-terminal here), absent under CI
and when stderr is a file or a pipe, where the stages' log lines alone are written.

The stages run in this process (`run(cfg)`, as the other tests call them) with `sys.stderr` on
the slave side of a pty; the benchmark's workers are real subprocesses, as always."""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import pty
import re
import struct
import sys
import termios
import threading
from collections.abc import Iterator

import pytest
from conftest import copy_export

from oipipe.core import progress
from oipipe.core.config import compose
from oipipe.deploy import build
from stages import benchmark, export, optimize

# tqdm's bar with a total: "desc:  50%|█████     | 1/2 [00:01<00:01, ...]"
BAR = r"{}: +\d+%\|"
ANY_BAR = r"\d+%\|"
HAS_TRT = build.missing(("torch_tensorrt", "cuda")) is None
TINY = [
    "benchmark.presets.default.batch_sizes=[1,2]",
    "benchmark.presets.default.trials=1",
    "benchmark.presets.default.warmup_iters=1",
    "benchmark.presets.default.warmup_seconds=0",
    "benchmark.presets.default.min_iters=2",
    "benchmark.presets.default.min_seconds=0",
    "benchmark.threads=1",
    "benchmark.throughput_mode.batch_sizes=[]",
    "benchmark.input_batches=2",
]


@contextlib.contextmanager
def stderr_on_terminal(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """sys.stderr on a new 40x120 pseudo-terminal, drained by a thread (a full pty blocks its
    writer); the list holds everything written to it once the block has ended."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the slave side is closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    out: list[str] = []
    with open(slave, "w", encoding="utf-8") as tty, monkeypatch.context() as m:
        m.setattr(sys, "stderr", tty)
        yield out
    reader.join(timeout=30)
    os.close(master)
    out.append(b"".join(chunks).decode(errors="replace"))


@pytest.fixture
def no_ci(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv("CI", raising=False)  # these tests may themselves run under CI
    return monkeypatch


@pytest.fixture(scope="module")
def cfg(exported_onnx, prepared, trained, tmp_path_factory):
    """The ONNX export, the record of trt_fp16 (skipped without TensorRT: the benchmark then
    times the two eager baselines alone, the quickest benchmark), and their config."""
    root = tmp_path_factory.mktemp("progress")
    cfg = compose(
        [
            "data=mirror",
            f"paths.root={root}",
            f"paths.prepared={prepared}",
            f"paths.models={trained.parent}",
            "tracking.enabled=false",
            "export.formats=[onnx]",
            "export.verify_batch_sizes=[1,2]",
            "optimize.calibration_images=16",
            "optimize.calibration_batch=4",
            "optimize.eval_batch=8",
            "optimize.variants=[trt_fp16]",
            "benchmark.device=cpu",
            *TINY,
        ]
    )
    copy_export(exported_onnx, cfg)
    optimize.run(cfg, "trt_fp16")
    return cfg


def test_quiet_follows_ci_and_the_terminal(no_ci) -> None:
    for ci, want in (("", False), ("0", False), ("false", False), ("1", True), ("true", True)):
        no_ci.setenv("CI", ci)
        with stderr_on_terminal(no_ci):
            assert progress.quiet() is want, ci
    no_ci.delenv("CI")
    with no_ci.context() as m:
        m.setattr(sys, "stderr", io.StringIO())
        assert progress.quiet()


@pytest.mark.slow
def test_export_draws_its_bar_on_a_terminal_and_none_under_ci(cfg, no_ci, tmp_path, caplog) -> None:
    # TorchScript alone (the quickest format), into folders of its own
    mine = compose(
        [
            f"paths.root={cfg.paths.root}",
            f"paths.prepared={cfg.paths.prepared}",
            f"paths.models={cfg.paths.models}",
            "data=mirror",
            "tracking.enabled=false",
            "export.formats=[torchscript]",
            "export.verify_batch_sizes=[1,2]",
            f"paths.exported={tmp_path / 'exported'}",
            f"paths.metrics={tmp_path}",
        ]
    )
    with stderr_on_terminal(no_ci) as shown:
        export.run(mine)
    assert re.search(BAR.format("export torchscript"), shown[0]), shown
    assert re.search(BAR.format("verify torchscript b2"), shown[0]), shown
    no_ci.setenv("CI", "true")
    caplog.clear()
    with stderr_on_terminal(no_ci) as ci, caplog.at_level("INFO"):
        export.run(mine)
    assert not re.search(ANY_BAR, ci[0]), ci
    assert "torchscript: model.ts" in caplog.text  # the log lines stay


@pytest.mark.slow
def test_an_int8_build_counts_its_calibration_on_a_terminal_only(cfg, no_ci, capfd) -> None:
    with stderr_on_terminal(no_ci) as shown:
        optimize.run(cfg, "onnxruntime_int8")
    # 16 images in batches of 4; the last redraw may be skipped (tqdm's mininterval)
    assert re.search(BAR.format("onnxruntime_int8 calibration") + r".*\| \d/4 ", shown[0]), shown
    assert re.search(BAR.format("onnxruntime_int8 evaluation"), shown[0]), shown
    capfd.readouterr()
    record = optimize.run(cfg, "onnxruntime_int8")  # stderr: pytest's capture file, no terminal
    assert record["status"] == "ok" and record["calibration_images"] == 16
    assert not re.search(ANY_BAR, capfd.readouterr().err)


@pytest.mark.slow
def test_the_benchmark_bar_names_the_variant_and_batch_being_timed(cfg, no_ci) -> None:
    with stderr_on_terminal(no_ci) as shown:
        table = benchmark.run(cfg)
    timed = ["eager_fp32", "eager_fp32_nchw", *(["trt_fp16"] if HAS_TRT else [])]
    assert {r["status"] for k, r in table["rows"].items() if k.split(".")[0] in timed} == {"ok"}
    trials = cfg.benchmark.presets[cfg.benchmark.protocol].trials
    steps = len(timed) * (2 + 2 * trials)  # loaded, a trial per round at b1 and b2, finished
    for variant in timed:
        for b in (1, 2):
            what = rf"round \d+/{trials} {variant} b{b}"
            assert re.search(BAR.format(what) + rf".*\| \d+/{steps} ", shown[0]), (
                variant,
                b,
                shown,
            )
    assert f"| {steps}/{steps} " in shown[0], shown  # a redraw per step, the last one included
