"""The stream client (`python -m oitools.stream`) and its sender (`oitools.stream_sender`), with
real
GStreamer (gst-launch-1.0), real processes, a real X server (Xvfb) and an exported ONNX model.

Without GStreamer or Xvfb these tests skip, except where OI_REQUIRE_GSTREAMER is set (.ci/run
installs both and sets it): then they fail.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import psutil
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from oipipe.core.config import PROJECT_ROOT
from oipipe.core.files import read_csv
from oipipe.data.datasets import eval_transform
from oipipe.deploy.runtime import load_artifact
from oitools import stream_sender as stream_server
from oitools.stream import client as stream
from oitools.stream import preprocess, sinks, sources

REALDATA = PROJECT_ROOT.parent / "shared" / "realdata"
RTP_CAPS = "application/x-rtp,media=video,encoding-name=H264,payload=96,clock-rate=90000"


def _require(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        if os.environ.get("OI_REQUIRE_GSTREAMER"):
            pytest.fail(f"{tool} not found: apt-get install {package} (.ci/run does)")
        pytest.skip(f"{tool} not found (apt-get install {package}; .ci/run installs it)")


@pytest.fixture(scope="module")
def gst() -> None:
    _require("gst-launch-1.0", sources.GST_PACKAGES)


@pytest.fixture(scope="module")
def onnx_model(exported_onnx) -> Path:
    """The `trained` fixture exported to ONNX alone (the session's export, read-only)."""
    return exported_onnx / "artifacts" / "exported" / "model.onnx"


@pytest.fixture(scope="module")
def photos(prepared) -> list[np.ndarray]:
    """Six real photographs as RGB arrays: two per class of ../shared/realdata beside the clone
    (CI has it), else the prepared test split's images."""
    if (REALDATA / "Bird").is_dir():
        files = [
            f
            for c in sorted(p for p in REALDATA.iterdir() if p.is_dir())[:3]
            for f in sorted(c.glob("*.jpg"))[:2]
        ]
    else:
        files = [prepared / r["file"] for r in read_csv(prepared / "test.csv")[:6]]
    out = []
    for f in files:
        with Image.open(f) as im:
            out.append(np.asarray(im.convert("RGB")))
    return out


def gst_children(pid: int) -> list[psutil.Process]:
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [k for k in kids if _alive(k) and k.name().startswith("gst-launch")]


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def free_udp_port() -> int:
    """A UDP port free on every address, below the kernel's ephemeral range: a port that bind(0)
    hands out is ephemeral, so between closing it here and udpsrc binding 0.0.0.0 any process's
    DNS query or connection can take it (CI saw "Address already in use")."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.Random().sample(range(max(1024, low - 8000), low), 200):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free UDP port below the ephemeral range")


class Lines:
    """A child's output stream collected line by line on a thread."""

    def __init__(self, stream_) -> None:
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._read, args=(stream_,), daemon=True)
        self._t.start()

    def _read(self, stream_) -> None:
        for raw in stream_:
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def wait_for(self, text: str, timeout: float, proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in ln for ln in self.lines):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no {text!r} from the client:\n" + "\n".join(self.lines))
            time.sleep(0.05)

    def text(self) -> str:
        self._t.join(timeout=10)
        return "\n".join(self.lines)


def client(*args: str, env: dict | None = None) -> tuple[subprocess.Popen, Lines, Lines]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "oitools.stream", *args],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    return proc, Lines(proc.stdout), Lines(proc.stderr)


def video_frames(file: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(file))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    return frames


def reference(model: Path, frames_bgr: list[np.ndarray]) -> tuple[list[str], np.ndarray]:
    """What the artifact predicts for these frames through the pipeline's own preprocessing."""
    runtime, meta = load_artifact(model)
    tf = eval_transform(meta["input_size"], meta["mean"], meta["std"], meta["crop_pct"])
    x = torch.stack(
        [tf(torch.from_numpy(f[..., ::-1].copy()).permute(2, 0, 1)) for f in frames_bgr]
    )
    p = stream.softmax(runtime(x))
    return [meta["classes"][i] for i in p.argmax(1)], p.max(1)


# --- preprocessing ---------------------------------------------------------------------------


@pytest.mark.slow
def test_preprocessing_matches_eval_transform_on_real_photos(photos, onnx_model) -> None:
    """Pillow's antialiased bilinear, the crop and the normalisation against torchvision's
    eval_transform: within one grey level everywhere, and the same top-1 from the artifact."""
    runtime, meta = load_artifact(onnx_model)
    for size, crop, mean, std in [
        (meta["input_size"], meta["crop_pct"], meta["mean"], meta["std"]),
        (224, 0.875, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ]:
        pre = preprocess.Preprocess(size, mean, std, crop)
        tf = eval_transform(size, mean, std, crop)
        ours = np.stack([pre(np.ascontiguousarray(rgb[..., ::-1])) for rgb in photos])
        theirs = torch.stack([tf(pil_to_tensor(Image.fromarray(rgb))) for rgb in photos])
        assert ours.shape == tuple(theirs.shape) == (len(photos), 3, size, size)
        level = np.abs(ours - theirs.numpy()) * np.array(std).reshape(1, 3, 1, 1) * 255
        assert level.max() <= 1.0 + 1e-3, level.max()  # at most one grey level apart
        assert level.mean() < 0.05, level.mean()  # and almost everywhere identical
        if size == meta["input_size"]:
            a, b = runtime(torch.from_numpy(ours)), runtime(theirs)
            assert (a.argmax(1) == b.argmax(1)).all()
            np.testing.assert_allclose(a, b, atol=0.02 * np.abs(b).max())


@pytest.mark.slow
def test_the_client_runs_an_onnx_file_without_torchvision(onnx_model, photos) -> None:
    code = (
        "import sys, numpy as np, torch\nfrom oitools.stream import client as stream\n"
        "from oitools.stream import preprocess\n"
        "rt, meta = stream.load_model(sys.argv[1])\n"
        "x = preprocess.Preprocess.from_meta(meta)(np.zeros((48, 64, 3), np.uint8))\n"
        "rt(torch.from_numpy(x[None]))\n"
        "assert 'torchvision' not in sys.modules, 'torchvision was imported'\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(onnx_model)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr


def test_display_transformations() -> None:
    img = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    gray = sinks.TRANSFORMS["gray"](img)
    assert gray.shape == img.shape and (gray[..., 0] == gray[..., 2]).all()
    assert (sinks.TRANSFORMS["flip"](img) == img[:, ::-1]).all()
    assert (sinks.TRANSFORMS["vflip"](img) == img[::-1]).all()
    edges = sinks.TRANSFORMS["edges"](
        np.kron(np.eye(2, dtype=np.uint8) * 255, np.ones((12, 16), np.uint8))[..., None].repeat(
            3, 2
        )
    )
    assert set(np.unique(edges)) == {0, 255}
    with pytest.raises(stream.InputError, match=r"unknown transform\(s\) \['sepia'\]"):
        stream.StreamOptions("videotestsrc", Path("m.onnx"), transforms=["sepia"]).check()


# --- sources ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.gstreamer
def test_loopback_rtp_h264_from_the_server(gst, onnx_model, tmp_path) -> None:
    """The server's test pattern over RTP/H.264 on 127.0.0.1 to the client: about N colour
    frames of the right size, each classified, the annotated video plays back with as many
    frames, Ctrl-C stops the client cleanly and leaves no gst-launch-1.0 behind."""
    n, port = 60, free_udp_port()
    out, stats_file = tmp_path / "annotated.avi", tmp_path / "stats.json"
    proc, stdout, stderr = client(
        f"udpsrc port={port} caps={RTP_CAPS} ! rtph264depay ! avdec_h264 ! videoconvert",
        "--model",
        str(onnx_model),
        "--out",
        str(out),
        "--json",
        "--stats",
        str(stats_file),
        "--drop",
        "no",
    )
    try:
        stderr.wait_for("playing (live source)", 90, proc)
        kids = gst_children(proc.pid)
        assert len(kids) == 1
        server = subprocess.run(
            [
                sys.executable,
                "-m",
                "oitools.stream_sender",
                "--source",
                "test",
                "--port",
                str(port),
                "--num-buffers",
                str(n),
                "--width",
                "320",
                "--height",
                "240",
            ],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert server.returncode == 0, server.stderr
        count, quiet_since = -1, time.monotonic()
        while time.monotonic() - quiet_since < 1.5:  # until the last frame is out
            if len(stdout.lines) != count:
                count, quiet_since = len(stdout.lines), time.monotonic()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, stderr.text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not [k for k in kids if _alive(k)], "gst-launch-1.0 left running"
    stats = json.loads(stats_file.read_text())
    frames = [json.loads(ln) for ln in stdout.text().splitlines()]
    classes = load_artifact(onnx_model)[1]["classes"]
    assert stats["end"] == "stopped" and (stats["width"], stats["height"]) == (320, 240)
    assert 0.9 * n <= stats["frames_received"] <= n, stats
    assert stats["frames_processed"] == stats["frames_received"] == len(frames)
    assert stats["frames_dropped"] == 0 and stats["live"] is True
    assert [f["frame"] for f in frames] == list(range(len(frames)))
    assert all(
        f["label"] in classes and 0 < f["score"] <= 1 and f["latency_ms"] > 0 for f in frames
    )
    written = video_frames(out)
    assert len(written) == len(frames)
    assert all(f.shape == (240, 320, 3) for f in written)
    bars = written[-1][100:160].astype(int)  # below the text box: SMPTE's colour bars
    assert (bars.max(2) - bars.min(2)).mean() > 60  # in colour, not grey


@pytest.mark.gstreamer
def test_file_of_real_photos_gets_the_artifacts_labels(
    gst, onnx_model, photos, tmp_path, capsys, caplog
) -> None:
    """A lossless video (FFV1) of real photographs, decoded by GStreamer, from the file and over
    HTTP: each frame gets the label and score the artifact gives the same frame through
    eval_transform; the stream ends at its end (exit 0), every frame kept (neither is live), up
    to 4 a model call; the grey transformation reaches the annotated video; the summary is logged to
    MLflow."""
    frames = [
        cv2.resize(np.ascontiguousarray(rgb[..., ::-1]), (320, 240), interpolation=cv2.INTER_AREA)
        for rgb in photos
    ]
    video = tmp_path / "photos.mkv"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"FFV1"), 5, (320, 240))
    for f in frames:
        writer.write(f)
    writer.release()
    assert all((a == b).all() for a, b in zip(video_frames(video), frames, strict=True))
    labels, scores = reference(onnx_model, frames)
    assert len(set(np.round(scores, 4))) == len(frames)  # a swapped frame would show

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as httpd:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{httpd.server_address[1]}/{video.name}"
        db = tmp_path / "mlflow.db"
        for source, extra in [
            (str(video), ["--mlflow", "--tracking-uri", f"sqlite:///{db}"]),
            (url, []),
        ]:
            out, stats_file = tmp_path / "gray.avi", tmp_path / "stats.json"
            rc = stream.main(
                [
                    source,
                    "--model",
                    str(onnx_model),
                    "--json",
                    "--out",
                    str(out),
                    "--transform",
                    "gray",
                    "--stats",
                    str(stats_file),
                    "--batch",
                    "4",
                    *extra,
                ]
            )
            assert rc == 0, caplog.text
            got = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
            assert [g["label"] for g in got] == labels, source
            np.testing.assert_allclose([g["score"] for g in got], scores, atol=2e-3)
            stats = json.loads(stats_file.read_text())
            assert stats["end"] == "eos" and stats["live"] is False
            assert stats["frames_received"] == stats["frames_processed"] == len(frames)
            assert stats["frames_dropped"] == 0 and all(g["batch"] <= 4 for g in got)
            written = video_frames(out)
            assert len(written) == len(frames)
            spread = np.stack(written).astype(int)
            assert (spread.max(3) - spread.min(3)).mean() < 3  # grey (MJPG keeps a trace)
            assert not gst_children(os.getpid())
        httpd.shutdown()

    from mlflow.tracking import MlflowClient

    exp = MlflowClient(f"sqlite:///{db}").get_experiment_by_name("oi-pipeline-stream")
    (run,) = MlflowClient(f"sqlite:///{db}").search_runs([exp.experiment_id])
    assert run.data.metrics["stream.frames_processed"] == len(frames)
    assert run.data.params["source"] == str(video) and run.data.tags["end"] == "eos"
    assert run.data.metrics["stream.model_p50_ms"] > 0


@pytest.mark.gstreamer
def test_rows_padded_to_four_bytes_are_read_whole(gst, onnx_model, tmp_path, caplog) -> None:
    """321 px of BGR is 963 bytes, which GStreamer pads to 964: every frame must come out
    unsheared (SMPTE's bars stay vertical) and the right size (the video file, written by
    OpenCV, drops the odd column)."""
    out, stats = tmp_path / "odd.mkv", tmp_path / "stats.json"
    rc = stream.main(
        [
            "videotestsrc num-buffers=3 ! video/x-raw,width=321,height=240",
            "--model",
            str(onnx_model),
            "--out",
            str(out),
            "--stats",
            str(stats),
        ]
    )
    assert rc == 0, caplog.text
    assert json.loads(stats.read_text())["width"] == 321
    written = video_frames(out)
    assert len(written) == 3 and written[0].shape == (240, 320, 3)
    bars = written[-1][110:150].astype(int)  # below the text box, inside the bars
    assert (bars.max(0) - bars.min(0)).max() <= 2  # each column one colour
    assert len(np.unique(bars[0], axis=0)) >= 7  # the seven bars


@pytest.mark.gstreamer
def test_stale_frames_are_dropped_when_the_model_is_slower(
    gst, onnx_model, tmp_path, capsys, caplog
) -> None:
    """--drop yes with a source far faster than the model (videotestsrc, not live, unpaced):
    frames are dropped and counted, the newest are kept, and none is lost uncounted."""
    stats_file = tmp_path / "stats.json"
    rc = stream.main(
        [
            "videotestsrc num-buffers=100 ! video/x-raw,width=320,height=240",
            "--model",
            str(onnx_model),
            "--drop",
            "yes",
            "--json",
            "--stats",
            str(stats_file),
        ]
    )
    assert rc == 0, caplog.text
    stats = json.loads(stats_file.read_text())
    seen = [json.loads(ln)["frame"] for ln in capsys.readouterr().out.splitlines()]
    assert stats["frames_received"] == 100 and stats["frames_dropped"] > 0
    assert stats["frames_processed"] + stats["frames_dropped"] == 100 == seen[-1] + 1
    assert len(seen) == stats["frames_processed"] and seen == sorted(set(seen))


# --- the window ------------------------------------------------------------------------------


def read_xwd(file: Path) -> np.ndarray:
    """An XWD image (what Xvfb's -fbdir keeps its screen in) as H x W x 3 RGB, for the 24-bit
    TrueColor screens Xvfb makes (32 bits per pixel, colour masks in the header)."""
    data = file.read_bytes()
    h = struct.unpack(">25I", data[:100])
    header_size, width, height, byte_order, bpp, stride = h[0], h[4], h[5], h[7], h[11], h[12]
    masks, ncolors = h[14:17], h[19]
    assert bpp == 32, f"{bpp} bits per pixel"
    start = header_size + 12 * ncolors
    px = np.frombuffer(data, "<u4" if byte_order == 0 else ">u4", height * stride // 4, start)
    px = px.reshape(height, stride // 4)[:, :width]

    def channel(mask: int) -> np.ndarray:
        shift = (mask & -mask).bit_length() - 1
        return ((px & mask) >> shift).astype(np.uint8)

    return np.stack([channel(m) for m in masks], axis=2)


@pytest.mark.slow
@pytest.mark.gstreamer
def test_window_under_xvfb_shows_the_annotated_flipped_frame(gst, onnx_model, tmp_path) -> None:
    """A real window on a virtual X server: the screen shows the frame mirrored (the `flip`
    transformation: SMPTE's blue bar left of its yellow one) with the text box drawn on it."""
    _require("Xvfb", "xvfb")
    r, w = os.pipe()
    xvfb = subprocess.Popen(
        [
            "Xvfb",
            "-displayfd",
            str(w),
            "-screen",
            "0",
            "640x480x24",
            "-fbdir",
            str(tmp_path),
            "-nolisten",
            "tcp",
            "-br",
        ],
        pass_fds=(w,),
        stderr=subprocess.DEVNULL,
    )
    os.close(w)
    proc = None
    try:
        display = os.read(r, 16).decode().strip()
        assert display, "Xvfb did not start"
        proc, _, stderr = client(
            "videotestsrc is-live=true ! video/x-raw,width=320,height=240,framerate=30/1",
            "--model",
            str(onnx_model),
            "--display",
            "--transform",
            "flip",
            env={"DISPLAY": f":{display}", "QT_QPA_PLATFORM": "xcb"},
        )
        deadline, screen = time.monotonic() + 90, None
        while time.monotonic() < deadline and proc.poll() is None:
            shot = read_xwd(tmp_path / "Xvfb_screen0")
            if (shot.sum(2) > 60).sum() > 0.8 * 320 * 240:  # the window is up and drawn
                time.sleep(0.5)  # a few more frames, then look
                screen = read_xwd(tmp_path / "Xvfb_screen0")
                break
            time.sleep(0.25)
        assert screen is not None, "no window appeared:\n" + "\n".join(stderr.lines)
        Image.fromarray(screen).save(tmp_path / "screen.png")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, stderr.text()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        xvfb.terminate()
        xvfb.wait(timeout=10)
        os.close(r)
    ys, xs = np.nonzero(screen.sum(2) > 60)
    win = screen[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(int)
    assert win.shape[:2] == (240, 320), win.shape
    band = win[110:150]
    r_, g_, b_ = band[..., 0], band[..., 1], band[..., 2]
    blue = np.nonzero((b_ > 150) & (r_ < 60) & (g_ < 60))[1]
    yellow = np.nonzero((r_ > 150) & (g_ > 150) & (b_ < 60))[1]
    assert len(blue) and len(yellow) and blue.mean() < yellow.mean()  # mirrored
    box = win[5:40, 5:80]  # the text box, top left, over the (now blue) bars
    dark, light = (box.max(2) < 40).mean(), (box.min(2) > 200).mean()
    assert dark > 0.5 and light > 0.02, (dark, light)


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.gstreamer
def test_errors_name_their_cause(gst, onnx_model, tmp_path, caplog) -> None:
    def fails(code: int, text: str, source: str, *args: str, model: Path = onnx_model) -> None:
        caplog.clear()
        t0 = time.monotonic()
        assert stream.main([source, "--model", str(model), *args]) == code, caplog.text
        assert text in caplog.text, caplog.text
        assert time.monotonic() - t0 < 20
        assert not gst_children(os.getpid())

    fails(2, "malformed GStreamer pipeline", "videotestsrc num-buffers=3 ! ! videoconvert")
    fails(2, "GStreamer has no element 'nosuchfilter'", "videotestsrc ! nosuchfilter")
    fails(2, "no such file", str(tmp_path / "missing.mp4"))
    if not sources.opencv_has_gstreamer():  # the PyPI wheel: no GStreamer backend to ask for
        fails(2, "this OpenCV was built without GStreamer", "videotestsrc", "--backend", "opencv")
    broken = tmp_path / "model.onnx"
    broken.write_bytes(onnx_model.read_bytes()[:2000])
    fails(2, f"{broken} cannot be loaded as onnx", "videotestsrc", model=broken)
    port = free_udp_port()
    fails(
        1,
        "no video from the source within 1 s (--stall-timeout)",
        f"udpsrc port={port} caps={RTP_CAPS} ! rtph264depay ! avdec_h264 ! videoconvert",
        "--stall-timeout",
        "1",
    )
    # a stall mid-stream: three raw frames through a named pipe that then stays open, silent
    fifo = tmp_path / "frames"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDWR)  # a writer that never writes again (no end of file)
    try:
        os.write(fd, np.zeros((3, 48, 64, 3), np.uint8).tobytes())
        stats = tmp_path / "stall.json"
        # filesrc reads whole blocks: one frame (64 * 48 * 3 bytes) each
        fails(
            1,
            "no frame for 1 s (--stall-timeout) after 3 frame(s): the stream stalled",
            f"filesrc location={fifo} blocksize=9216 ! rawvideoparse width=64 height=48 "
            "format=bgr framerate=30/1",
            "--stall-timeout",
            "1",
            "--stats",
            str(stats),
        )
        assert json.loads(stats.read_text())["end"] == "stall"
    finally:
        os.close(fd)


def test_server_streams_the_test_pattern_without_a_camera(capsys) -> None:
    assert stream_server.main(["--dry-run", "--device", "/dev/no-such-camera"]) == 0
    out = capsys.readouterr()
    assert "no camera at /dev/no-such-camera: streaming the test pattern" in out.err
    assert "videotestsrc is-live=true" in out.out and "x264enc tune=zerolatency" in out.out
    assert "rtph264pay config-interval=1 pt=96 ! udpsink host=127.0.0.1 port=5000" in out.out
    assert (
        stream_server.main(["--source", "camera", "--device", "/dev/no-such-camera", "--dry-run"])
        == 2
    )
    assert "no camera at /dev/no-such-camera" in capsys.readouterr().err


def test_queued_frames_form_batches_up_to_the_limit_in_order() -> None:
    """What the model loop gets when the decoder is ahead (the end-to-end tests cannot force
    that: on a fast enough machine the model keeps up and every call is one frame)."""
    queue, stop = sources.FrameQueue(capacity=8, drop=False), threading.Event()
    for i in range(6):
        queue.put(sources.Frame(i, np.zeros((2, 2, 3), np.uint8), 0.0, 0.0), stop)
    assert [f.seq for f in queue.get(4, timeout=0)] == [0, 1, 2, 3]
    assert [f.seq for f in queue.get(4, timeout=0)] == [4, 5]
    assert queue.get(4, timeout=0) == []
    queue.close()
    assert queue.get(4, timeout=0) is None
