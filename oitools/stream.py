"""Entry point `stream`: classify a live video stream with any artifact of the pipeline (usage,
options and exit codes: README, "Live inference on a GStreamer stream", and `--help`).

Not a DVC stage (a stream is no versioned input) but a peer of the stages: it imports no stage
module, only `runtime` (how every artifact is loaded and run), `config`/`errors` and, with
`--mlflow`, `tracking`. It never imports torchvision: an edge box running an ONNX file needs
onnxruntime, numpy, OpenCV and Pillow (torch comes with `oipipe.deploy.runtime`).

Frames: OpenCV's GStreamer backend (an `appsink`) when the installed OpenCV was built with it
(`cv2.getBuildInformation()`: "GStreamer: YES"; the PyPI wheels are not), otherwise a
`gst-launch-1.0 -v` child writing raw BGR frames to a pipe (`fdsink fd=N`, its own descriptor:
gst-launch prints progress and `-v` notifications on stdout) and this process reading whole frames
from it. Width, height and frame rate come from the caps the sink negotiated, which `-v` prints;
a BGR row is padded to a multiple of 4 bytes (GStreamer's default stride), so a frame is
`height * round_up_4(3 * width)` bytes.

Per frame, the preprocessing of the artifact's metadata is what `datasets.eval_transform`
does, in numpy and Pillow (no torchvision), so a frame is classified as the test images were.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import math
import os
import re
import resource
import select
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import cv2
import numpy as np
from PIL import Image

from oipipe.core import cli
from oipipe.core.errors import InputError, StageError

log = logging.getLogger("oitools.stream")

GST_LAUNCH = "gst-launch-1.0"
SINK = "oi_sink"  # the name of the pipeline's last element, whose caps `-v` reports
GST_PACKAGES = ("gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good "
                "gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav")
# cv2.VideoWriter's codec per file extension: MJPG (every frame a JPEG, plays anywhere), MPEG-4
# part 2 for .mp4 (no H.264 encoder in the PyPI wheel), FFV1 for .mkv (lossless)
VIDEO_CODECS = {".avi": "MJPG", ".mp4": "mp4v", ".mkv": "FFV1"}
DROP_MODES = ("auto", "yes", "no")
WINDOW = "oi-pipeline stream"


class Stalled(StageError):
    """No frame for `--stall-timeout` seconds."""


# --- what the client is asked to do --------------------------------------------------------------


@dataclass
class StreamOptions:
    source: str
    model: Path
    backend: str = "auto"          # auto | gst-launch | opencv
    batch: int = 1                 # frames per model call, at most (what is queued; no waiting)
    drop: str = "auto"             # auto: drop stale frames iff the pipeline is live
    topk: int = 3
    transforms: list[str] = field(default_factory=list)  # applied in order before display/output
    display: bool = False
    out: Path | None = None        # annotated video (.avi, .mp4, .mkv)
    json_lines: bool = False       # one JSON line per processed frame on stdout
    stats: Path | None = None      # the summary as flat JSON
    stall_timeout: float = 10.0    # seconds without a frame before the stream counts as stalled
    max_frames: int = 0            # stop after this many processed frames (0: no limit)
    mlflow_uri: str | None = None  # log the summary to MLflow (a run under this tracking URI)
    mlflow_experiment: str = "oi-pipeline-stream"

    def check(self) -> None:
        if self.backend not in ("auto", *BACKENDS):
            raise InputError(f"unknown backend {self.backend!r}; expected one of "
                             f"{sorted(['auto', *BACKENDS])}")
        if self.drop not in DROP_MODES:
            raise InputError(f"unknown drop mode {self.drop!r}; expected one of "
                             f"{sorted(DROP_MODES)}")
        unknown = [t for t in self.transforms if t not in TRANSFORMS]
        if unknown:
            raise InputError(f"unknown transform(s) {unknown}; expected any of "
                             f"{sorted(TRANSFORMS)}")
        if self.batch < 1 or self.topk < 1 or self.max_frames < 0 or self.stall_timeout <= 0:
            raise InputError("--batch >= 1, --topk >= 1, --max-frames >= 0 and "
                             "--stall-timeout > 0 are required")
        if self.out is not None and self.out.suffix.lower() not in VIDEO_CODECS:
            raise InputError(f"--out {self.out}: unknown video extension; expected one of "
                             f"{sorted(VIDEO_CODECS)}")


# --- preprocessing, as eval_transform does it, without torchvision -------------------------------


class Preprocess:
    """A BGR uint8 frame -> the float32 CHW input `eval_transform(input_size, mean, std,
    crop_pct)` makes from the same picture in RGB.

    torchvision's `v2.Resize(antialias=True)` on a uint8 tensor is Pillow's antialiased bilinear
    filter (torch's uint8 kernel reproduces Pillow's fixed-point resampling), so Pillow does the
    resize here: on real photographs the two agree within one grey level (tests/test_stream.py);
    cv2.INTER_AREA, a box filter, differs by up to tens of levels at edges. Sizes and the crop
    offset follow torchvision: the longer side is truncated (`int(short * long / short_in)`), the
    offset rounded (`int(round((size_in - size) / 2))`). The frame is resized in BGR (the filter
    works per channel) and turned to RGB only after the crop, on far fewer pixels."""

    def __init__(self, input_size: int, mean: Sequence[float], std: Sequence[float],
                 crop_pct: float):
        self.size = int(input_size)
        self.short = round(input_size / crop_pct)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)

    @classmethod
    def from_meta(cls, meta: dict) -> Preprocess:
        return cls(meta["input_size"], meta["mean"], meta["std"], meta["crop_pct"])

    def resized_shape(self, h: int, w: int) -> tuple[int, int]:
        if w <= h:
            return int(self.short * h / w), self.short
        return self.short, int(self.short * w / h)

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        h, w = frame.shape[:2]
        nh, nw = self.resized_shape(h, w)
        if (nh, nw) != (h, w):
            frame = np.asarray(Image.fromarray(frame).resize((nw, nh), Image.Resampling.BILINEAR))
        top, left = int(round((nh - self.size) / 2.0)), int(round((nw - self.size) / 2.0))
        crop = frame[top:top + self.size, left:left + self.size, ::-1]  # BGR -> RGB
        x = crop.transpose(2, 0, 1).astype(np.float32) / 255.0
        return np.ascontiguousarray((x - self.mean) / self.std)


# --- display transformations ---------------------------------------------------------------------


def _gray(img: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)


def _edges(img: np.ndarray) -> np.ndarray:
    # Canny's usual 1:2 hysteresis pair on 8-bit grey
    return cv2.cvtColor(cv2.Canny(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), 100, 200),
                        cv2.COLOR_GRAY2BGR)


TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "gray": _gray,
    "flip": lambda img: cv2.flip(img, 1),   # left-right, a mirror (what a webcam preview does)
    "vflip": lambda img: cv2.flip(img, 0),  # upside down
    "edges": _edges,
}


# --- frames in -----------------------------------------------------------------------------------


@dataclass
class Frame:
    seq: int            # index among the frames received, from 0
    image: np.ndarray   # H x W x 3 BGR uint8
    arrived: float      # time.perf_counter() when the whole frame had been read
    wall: float         # time.time() at the same moment


class FrameQueue:
    """Frames between the reader thread and the model loop.

    drop=True: it holds the `capacity` newest frames; a frame arriving at a full queue pushes out
    the oldest (a stale frame, counted in `dropped`). drop=False: the reader waits for room, so
    GStreamer waits too (back-pressure: a file is decoded no faster than it is classified)."""

    def __init__(self, capacity: int, drop: bool):
        self.capacity, self.drop = capacity, drop
        self.received = self.dropped = 0
        self.error: BaseException | None = None
        self._items: deque[Frame] = deque()
        self._closed = False
        self._cond = threading.Condition()

    def put(self, frame: Frame, stop: threading.Event) -> None:
        with self._cond:
            self.received += 1
            if self.drop:
                while len(self._items) >= self.capacity:
                    self._items.popleft()
                    self.dropped += 1
            else:
                while len(self._items) >= self.capacity and not stop.is_set():
                    self._cond.wait(0.25)
            self._items.append(frame)
            self._cond.notify_all()

    def close(self, error: BaseException | None = None) -> None:
        with self._cond:
            self._closed, self.error = True, error
            self._cond.notify_all()

    def get(self, n: int, timeout: float) -> list[Frame] | None:
        """Up to `n` queued frames (waiting at most `timeout` for the first); [] when none came
        yet, None once the reader has closed the queue and it is empty."""
        with self._cond:
            if not self._items and not self._closed:
                self._cond.wait(timeout)
            if self._items:
                batch = [self._items.popleft() for _ in range(min(n, len(self._items)))]
                self._cond.notify_all()
                return batch
            return None if self._closed else []

    def discard(self) -> None:
        """Frames left unprocessed at a stop count as dropped (received = processed + dropped)."""
        with self._cond:
            self.dropped += len(self._items)
            self._items.clear()
            self._cond.notify_all()


def source_head(source: str) -> tuple[list[str], str]:
    """The GStreamer elements that produce SOURCE's video, as gst-launch arguments, and its kind
    (pipeline, file, camera, url). Each argument is one element or property: gst-launch escapes
    the spaces inside an argument, so a file name with spaces stays one value."""
    s = source.strip()
    if not s:
        raise InputError("empty source: give a pipeline, a video file, a camera or a URL")
    scheme = urlsplit(s).scheme.lower()
    if Path(s).is_file():
        return ["uridecodebin", f"uri={Path(s).resolve().as_uri()}"], "file"
    if re.fullmatch(r"\d+", s) or re.fullmatch(r"/dev/video\d+", s):
        device = f"/dev/video{s}" if s.isdigit() else s
        if not Path(device).exists():
            raise InputError(f"no camera at {device} (is it plugged in? `v4l2-ctl "
                             "--list-devices` lists them)")
        # decodebin: raw frames pass straight through, an MJPEG-only webcam's get decoded
        return ["v4l2src", f"device={device}", "!", "decodebin"], "camera"
    if scheme in ("rtsp", "rtsps"):
        # rtspsrc's jitter buffer waits 2000 ms by default; 200 ms keeps a live view live
        return ["rtspsrc", f"location={s}", "latency=200", "!", "decodebin"], "url"
    if scheme in ("http", "https", "file"):
        return ["uridecodebin", f"uri={s}"], "url"
    if not re.search(r"\s", s) and ("/" in s or Path(s).suffix):
        raise InputError(f"{s}: no such file (and not a camera, a URL or a GStreamer pipeline)")
    try:
        tokens = shlex.split(s)
    except ValueError as e:
        raise InputError(f"malformed GStreamer pipeline {s!r}: {e}") from e
    while tokens and tokens[-1] == "!":
        tokens.pop()
    return tokens, "pipeline"


def gst_description(tokens: Sequence[str]) -> str:
    """Arguments back to one pipeline string (what OpenCV takes and what a log shows)."""
    def quote(t: str) -> str:
        if re.search(r"\s", t) and "=" in t:
            key, value = t.split("=", 1)
            return f'{key}="{value}"'
        return t
    return " ".join(quote(t) for t in tokens)


def _parse_caps(caps: str) -> dict[str, Any] | None:
    """`video/x-raw, format=(string)BGR, width=(int)640, height=(int)480, ...,
    framerate=(fraction)30/1` as a dict; None for anything else (`NULL` at shutdown)."""
    w, h = re.search(r"width=\(int\)(\d+)", caps), re.search(r"height=\(int\)(\d+)", caps)
    if not (w and h):
        return None
    fmt = re.search(r"format=\(string\)(\w+)", caps)
    fps = re.search(r"framerate=\(fraction\)(\d+)/(\d+)", caps)
    return {"format": fmt.group(1) if fmt else None, "width": int(w.group(1)),
            "height": int(h.group(1)),
            "framerate": int(fps.group(1)) / int(fps.group(2)) if fps and int(fps.group(2))
            else 0.0}


# GStreamer's messages that mean the request, not the stream, is wrong (exit code 2)
_USER_ERRORS = ("not-negotiated", "Could not determine type of stream", "No decoder available",
                "missing plugin", "Resource not found", "No such file", "Could not open device",
                "Cannot identify device", "not a capture device", "cannot decode")


def gst_error(lines: Sequence[str], returncode: int | None, description: str,
              before_video: bool = False) -> Exception:
    """What gst-launch's last lines say went wrong, as the exception the exit code follows:
    InputError for a pipeline that cannot be built or negotiated, a missing element or plugin,
    and (`before_video`) a file or device that gives no video; StageError otherwise."""
    text = "\n".join(lines)
    m = re.search(r'erroneous pipeline: no element "([^"]+)"', text)
    if m:
        el = m.group(1)
        return InputError(f"GStreamer has no element {el!r} (a typo, or its plugin is not "
                          f"installed: `gst-inspect-1.0 {el}` finds it once it is; Debian: "
                          f"apt-get install {GST_PACKAGES})")
    m = re.search(r"erroneous pipeline: (.*)", text)
    if m:
        return InputError(f"malformed GStreamer pipeline {description!r}: {m.group(1).strip()}")
    errors = []
    for i, line in enumerate(lines):
        m = re.match(r"ERROR: from element (\S+): (.*)", line)
        if m:  # the element, its message, and the debug line two below "Additional debug info"
            debug = lines[i + 3].strip() if i + 3 < len(lines) and lines[i + 1].startswith(
                "Additional debug info") else ""
            errors.append(f"{m.group(1).rsplit('/', 1)[-1]}: {m.group(2)}"
                          + (f" ({debug})" if debug else ""))
    msg = "; ".join(dict.fromkeys(errors)) or next(
        (ln for ln in reversed(lines) if ln.strip()), f"exit code {returncode}, no message")
    if "not-negotiated" in text:
        return InputError(f"the source's output cannot be turned into BGR video (caps not "
                          f"negotiated: does {description!r} end in decoded raw video? add a "
                          f"decoder, e.g. decodebin): {msg}")
    if before_video or any(k in text for k in _USER_ERRORS):
        return InputError(f"GStreamer cannot read the source {description!r}: {msg}")
    return StageError(f"GStreamer failed (gst-launch-1.0 exit code {returncode}): {msg}")


class GstLaunchSource:
    """`gst-launch-1.0 -v HEAD ! videoconvert ! video/x-raw,format=BGR ! fdsink fd=N`, frames
    read from the pipe on a thread into a FrameQueue.

    The child runs in its own session (a terminal's Ctrl-C reaches this process, which stops it
    in order) and dies with this process even if it is killed (PR_SET_PDEATHSIG), so no
    gst-launch-1.0 is ever left behind. Its stdout and stderr (progress, `-v` caps, errors) are
    read on a second thread: the caps line gives the frame size, "Pipeline is live" the drop mode,
    "Setting pipeline to PAUSED" the start of the stall clock."""

    name = "gst-launch"

    def __init__(self, tokens: list[str], kind: str):
        exe = shutil.which(GST_LAUNCH)
        if exe is None:
            raise InputError(f"{GST_LAUNCH} not found on PATH: install GStreamer (Debian: "
                             f"apt-get install {GST_PACKAGES})")
        self.description = gst_description(tokens)
        self.kind = kind
        self.caps: dict[str, Any] | None = None
        self.live = False
        self.lines: deque[str] = deque(maxlen=200)
        self.waiting_since: float | None = None  # when the reader began waiting for bytes
        self.queue: FrameQueue | None = None
        self._stop = threading.Event()
        self._started, self._caps_known, self._exited = (threading.Event(), threading.Event(),
                                                         threading.Event())
        self._caps_changed: str | None = None
        r, w = os.pipe()
        self._fd = r
        cmd = [exe, "-v", "-f", "-X", "last-message", *tokens, "!", "videoconvert", "!",
               "video/x-raw,format=BGR", "!", "fdsink", f"name={SINK}", f"fd={w}", "sync=false"]
        log.info("source: %s", self.description)
        log.debug("command: %s", shlex.join(cmd))
        self._rusage0 = _children_cpu()
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, pass_fds=(w,),
                                         start_new_session=True, preexec_fn=_die_with_parent)
        except OSError:
            os.close(r)
            raise
        finally:
            os.close(w)  # the child's copy is the only writer left: its exit is our end of file
        self._messages = threading.Thread(target=self._read_messages, daemon=True,
                                          name="gst-messages")
        self._messages.start()

    def _read_messages(self) -> None:
        assert self.proc.stdout is not None
        try:
            for raw in self.proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip()
                self.lines.append(line)
                log.debug("gst: %s", line)
                if f"{SINK}.GstPad:sink: caps = " in line:
                    caps = _parse_caps(line.split(" caps = ", 1)[1])
                    if caps is None:
                        continue
                    if self.caps is None:
                        self.caps = caps
                        self._caps_known.set()
                    elif (caps["width"], caps["height"]) != (self.caps["width"],
                                                             self.caps["height"]):
                        self._caps_changed = f"{caps['width']}x{caps['height']}"
                elif line.startswith("Setting pipeline to PAUSED"):
                    self._started.set()
                elif line.startswith("Pipeline is live"):
                    self.live = True
                elif line.startswith("Setting pipeline to PLAYING"):
                    log.info("playing (%s source)", "live" if self.live else "non-live")
        finally:  # whatever happened here, the readers must learn that the child is gone
            self.proc.wait()
            self._exited.set()

    def wait_ready(self, stall_timeout: float, stop: threading.Event) -> bool:
        """Block until the sink's caps are known (True), or we are asked to stop (False).
        Raises what gst-launch reported if it exits first, Stalled if no video comes within
        `stall_timeout` seconds of the pipeline starting."""
        since = None
        while not self._caps_known.wait(0.1):
            if stop.is_set():
                return False
            if self._exited.is_set():
                if self._caps_known.is_set():
                    break
                if self.proc.returncode == 0 and self._started.is_set():
                    raise InputError(f"the source {self.description!r} ended before any video "
                                     "(has it a video stream?)")
                raise gst_error(list(self.lines), self.proc.returncode, self.description,
                                before_video=self.kind in ("file", "camera"))
            if since is None and self._started.is_set():
                since = time.perf_counter()
            if since is not None and time.perf_counter() - since > stall_timeout:
                raise Stalled(f"no video from the source within {stall_timeout:g} s "
                              "(--stall-timeout): nothing arrives (is the sender running, the "
                              "address and port right?)")
        return True

    def start(self, queue: FrameQueue) -> None:
        self.queue = queue
        self._reader = threading.Thread(target=self._read_frames, daemon=True, name="gst-frames")
        self._reader.start()

    def _read_frames(self) -> None:
        assert self.queue is not None and self.caps is not None
        error: BaseException | None = None
        w, h = self.caps["width"], self.caps["height"]
        stride = (3 * w + 3) & ~3  # GStreamer's default row stride: padded to 4 bytes
        log.info("video %dx%d BGR at %.4g fps (%s, %s)", w, h, self.caps["framerate"],
                 self.kind, "live" if self.live else "not live")
        seq = 0
        try:
            with open(self._fd, "rb", buffering=0, closefd=False) as pipe:
                while not self._stop.is_set():
                    self.waiting_since = time.perf_counter()
                    buf = self._read_exact(pipe, stride * h)
                    self.waiting_since = None
                    if buf is None:
                        break
                    if self._caps_changed:
                        raise StageError(f"the source changed its frame size from {w}x{h} to "
                                         f"{self._caps_changed} mid-stream: not supported")
                    rows = np.frombuffer(buf, np.uint8).reshape(h, stride)
                    image = rows.reshape(h, w, 3) if stride == 3 * w else \
                        np.ascontiguousarray(rows[:, :3 * w].reshape(h, w, 3))
                    self.queue.put(Frame(seq, image, time.perf_counter(), time.time()),
                                   self._stop)
                    seq += 1
            if not self._stop.is_set():
                self._exited.wait()
                bad = any(ln.startswith("ERROR:") for ln in self.lines)
                if bad or self.proc.returncode != 0:
                    error = gst_error(list(self.lines), self.proc.returncode, self.description)
        except BaseException as e:  # handed to the model loop, which raises it
            error = e
        finally:
            self.waiting_since = None
            self.queue.close(error)

    def _read_exact(self, pipe, n: int) -> bytearray | None:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            ready, _, _ = select.select([pipe], [], [], 0.25)
            if self._stop.is_set():
                return None
            if not ready:
                continue
            k = pipe.readinto(view[got:])
            if not k:
                if got:
                    log.warning("the stream ended inside a frame (%d of %d bytes): dropped",
                                got, n)
                return None
            got += k
        return buf

    def close(self) -> float:
        """Stop the child (if still running) and the threads; the child's CPU seconds."""
        self._stop.set()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._messages.join(timeout=5)
        if hasattr(self, "_reader"):
            self._reader.join(timeout=5)
        os.close(self._fd)
        return _children_cpu() - self._rusage0


class OpenCVSource:
    """OpenCV's GStreamer backend: the same pipeline ending in an appsink, read with
    `VideoCapture.read()` on a thread. Size and rate are what the appsink negotiated
    (CAP_PROP_FRAME_WIDTH/HEIGHT/FPS). OpenCV gives no live flag and no GStreamer message, so
    `--drop auto` drops for cameras and URLs, and a failure to open names no element."""

    name = "opencv"

    def __init__(self, tokens: list[str], kind: str):
        self.description = gst_description(tokens)
        self.kind = kind
        self.live = kind in ("camera", "url")
        self.waiting_since: float | None = time.perf_counter()
        self.queue: FrameQueue | None = None
        self._stop = threading.Event()
        log.info("source: %s (OpenCV's GStreamer backend)", self.description)
        self.cap = cv2.VideoCapture(f"{self.description} ! videoconvert ! "
                                    f"video/x-raw,format=BGR ! appsink name={SINK} sync=false "
                                    "max-buffers=2 drop=false", cv2.CAP_GSTREAMER)
        if not self.cap.isOpened():
            raise InputError(f"OpenCV's GStreamer backend cannot open {self.description!r} (a "
                             "malformed pipeline, a missing element or an unreadable source; "
                             "`--backend gst-launch` reports GStreamer's own message)")
        fps = self.cap.get(cv2.CAP_PROP_FPS)
        self.caps = {"format": "BGR", "width": int(self.cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
                     "height": int(self.cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
                     "framerate": fps if fps and math.isfinite(fps) else 0.0}
        self._cpu = 0.0

    def wait_ready(self, stall_timeout: float, stop: threading.Event) -> bool:
        return True  # VideoCapture opened: the caps are negotiated

    def start(self, queue: FrameQueue) -> None:
        self.queue = queue
        self._reader = threading.Thread(target=self._read_frames, daemon=True, name="cv-frames")
        self._reader.start()

    def _read_frames(self) -> None:
        assert self.queue is not None
        error: BaseException | None = None
        seq = 0
        try:
            while not self._stop.is_set():
                self.waiting_since, c0 = time.perf_counter(), time.thread_time()
                ok, image = self.cap.read()
                self._cpu += time.thread_time() - c0
                self.waiting_since = None
                if not ok:
                    break
                self.queue.put(Frame(seq, image, time.perf_counter(), time.time()), self._stop)
                seq += 1
        except BaseException as e:
            error = e
        finally:
            self.waiting_since = None
            self.queue.close(error)

    def close(self) -> float:
        self._stop.set()
        # a read() blocked on a stalled source cannot be interrupted: the daemon thread is left
        if hasattr(self, "_reader"):
            self._reader.join(timeout=2)
        if not (hasattr(self, "_reader") and self._reader.is_alive()):
            self.cap.release()
        return self._cpu


BACKENDS = {"gst-launch": GstLaunchSource, "opencv": OpenCVSource}


def opencv_has_gstreamer() -> bool:
    return bool(re.search(r"GStreamer:\s+YES", cv2.getBuildInformation()))


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


_PR_SET_PDEATHSIG = 1
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not in the forked child
except (OSError, AttributeError):  # not Linux
    _prctl = None


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the parent (thread) dies, however it dies."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def open_source(opts: StreamOptions) -> GstLaunchSource | OpenCVSource:
    tokens, kind = source_head(opts.source)
    backend = opts.backend
    if backend == "auto":
        backend = "opencv" if opencv_has_gstreamer() else "gst-launch"
    elif backend == "opencv" and not opencv_has_gstreamer():
        raise InputError("--backend opencv: this OpenCV was built without GStreamer "
                         "(cv2.getBuildInformation()); use --backend gst-launch")
    return BACKENDS[backend](tokens, kind)


# --- frames out ----------------------------------------------------------------------------------


def annotate(img: np.ndarray, top: list[tuple[str, float]], fps: float,
             dropped: int | None) -> np.ndarray:
    """Top-k labels and scores and the running FPS, white on a black box at the top left; the
    font scales with the frame (0.6 at 480 rows)."""
    h = img.shape[0]
    scale = max(0.35, 0.6 * h / 480)
    thick = max(1, round(scale * 1.7))
    lines = [f"{label} {score:.2f}" for label, score in top]
    lines.append(f"{fps:.1f} FPS" + (f", {dropped} dropped" if dropped is not None else ""))
    sizes = [cv2.getTextSize(t, cv2.FONT_HERSHEY_SIMPLEX, scale, thick) for t in lines]
    step = max(s[0][1] + s[1] for s in sizes) + max(2, round(6 * scale))
    width = max(s[0][0] for s in sizes) + round(16 * scale)
    cv2.rectangle(img, (0, 0), (width, step * len(lines) + round(6 * scale)), (0, 0, 0), -1)
    for i, t in enumerate(lines):
        cv2.putText(img, t, (round(8 * scale), step * (i + 1)), cv2.FONT_HERSHEY_SIMPLEX, scale,
                    (255, 255, 255), thick, cv2.LINE_AA)
    return img


class VideoOut:
    """The annotated frames as a video file, written under a temporary name in the same folder
    and moved into place when closed: a killed client leaves no half-written file under the
    final name. Opened at the first frame (the size is known only then). An odd width or
    height loses its last column or row: OpenCV's FFmpeg writer rounds sizes down to even and
    then garbles MJPG frames it was handed uncropped."""

    def __init__(self, path: Path, fps: float):
        self.path, self.fps = path, fps if fps > 0 else 30.0  # a variable rate (0/1): 30
        self.tmp = path.with_name(f".{path.stem}.part{path.suffix}")
        self.writer: cv2.VideoWriter | None = None
        self.frames = 0

    def write(self, img: np.ndarray) -> None:
        img = img[:img.shape[0] & ~1, :img.shape[1] & ~1]  # OpenCV's writer wants even sizes
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fourcc = cv2.VideoWriter_fourcc(*VIDEO_CODECS[self.path.suffix.lower()])
            h, w = img.shape[:2]
            self.writer = cv2.VideoWriter(str(self.tmp), fourcc, self.fps, (w, h))
            if not self.writer.isOpened():
                raise InputError(f"cannot write {self.path}: OpenCV has no "
                                 f"{VIDEO_CODECS[self.path.suffix.lower()]} writer for "
                                 f"{w}x{h}")
        self.writer.write(img)
        self.frames += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()
            os.replace(self.tmp, self.path)
            log.info("wrote %s (%d frames at %.4g fps)", self.path, self.frames, self.fps)


class Display:
    """A window (OpenCV's HighGUI: Qt in the PyPI wheel). `show` is False once the user asks to
    stop: `q` or Esc, or the window closed."""

    def __init__(self) -> None:
        if "GUI: NONE" in re.sub(r"\s+", " ", cv2.getBuildInformation()):
            raise InputError("--display: this OpenCV has no GUI (opencv-python-headless?); "
                             "install opencv-python, or use --out")
        if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            raise InputError("--display needs a display and DISPLAY is not set: run it in a "
                             "desktop session, over `ssh -X`, or under `xvfb-run`; or use --out")
        self.opened = False

    def show(self, img: np.ndarray) -> bool:
        if not self.opened:
            # GUI_NORMAL: no Qt toolbar or status bar, just the picture
            cv2.namedWindow(WINDOW, cv2.WINDOW_AUTOSIZE | cv2.WINDOW_GUI_NORMAL)
            self.opened = True
        cv2.imshow(WINDOW, img)
        key = cv2.waitKey(1) & 0xFF
        return key not in (ord("q"), 27) and cv2.getWindowProperty(
            WINDOW, cv2.WND_PROP_VISIBLE) >= 1

    def close(self) -> None:
        if self.opened:
            cv2.destroyWindow(WINDOW)
            cv2.waitKey(1)


# --- statistics ----------------------------------------------------------------------------------


@dataclass
class Stats:
    processed: int = 0
    batches: int = 0
    first_out: float | None = None   # perf_counter when the first frame was out
    last_out: float | None = None    # ... the last
    latency_ms: list[float] = field(default_factory=list)   # per frame: arrival -> out
    model_ms: list[float] = field(default_factory=list)     # per model call
    wall: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("preprocess", "model", "postprocess"), 0.0))
    cpu: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("preprocess", "model", "postprocess"), 0.0))
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=30))

    def fps_now(self) -> float:
        """Frames out per second over the last (up to) 30."""
        if len(self.recent) < 2 or self.recent[-1] == self.recent[0]:
            return 0.0
        return (len(self.recent) - 1) / (self.recent[-1] - self.recent[0])


@contextlib.contextmanager
def cpu_and_wall(stats: Stats, part: str) -> Iterator[None]:
    """Wall and process CPU seconds of one part of the loop. Process CPU counts every thread:
    inference's own pool during the model, the reader thread (a copy per frame) throughout."""
    w0, c0 = time.perf_counter(), time.process_time()
    yield
    stats.wall[part] += time.perf_counter() - w0
    stats.cpu[part] += time.process_time() - c0


def percentile(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if len(values) else None


def summary(stats: Stats, queue: FrameQueue | None, src: Any, decode_cpu: float,
            end: str, opts: StreamOptions) -> dict[str, Any]:
    """Flat JSON: counts, rates, latency percentiles and where the time went.

    decode_cpu_s is the GStreamer child's CPU seconds (decoding, conversion to BGR, network
    and depayloading), from getrusage once it has exited (with the OpenCV backend, the CPU time
    of the thread that called read()); the other parts are this process's CPU seconds around
    each step of the loop. The shares divide by their sum: where the machine's work went."""
    span = stats.last_out - stats.first_out if stats.first_out is not None else 0.0
    caps = getattr(src, "caps", None) or {}
    cpu = {"decode": decode_cpu, **stats.cpu}
    total = sum(cpu.values())
    out: dict[str, Any] = {
        "source": opts.source, "model": str(opts.model), "backend": getattr(src, "name", None),
        "live": getattr(src, "live", None), "width": caps.get("width"),
        "height": caps.get("height"), "input_fps": caps.get("framerate"), "end": end,
        "batch": opts.batch, "drop": bool(queue.drop) if queue else None,
        "frames_received": queue.received if queue else 0,
        "frames_processed": stats.processed, "frames_dropped": queue.dropped if queue else 0,
        "model_calls": stats.batches,
        "mean_batch": round(stats.processed / stats.batches, 3) if stats.batches else None,
        "wall_s": round(span, 4),
        "fps": round((stats.processed - 1) / span, 3) if span > 0 else None,
    }
    for q in (50, 90, 99):
        out[f"latency_p{q}_ms"] = percentile(stats.latency_ms, q)
    for q in (50, 90, 99):
        out[f"model_p{q}_ms"] = percentile(stats.model_ms, q)
    for part, v in cpu.items():
        out[f"{part}_cpu_s"] = round(v, 4)
    for part, v in stats.wall.items():
        out[f"{part}_wall_s"] = round(v, 4)
    for part, v in cpu.items():
        out[f"{part}_share_pct"] = round(100 * v / total, 2) if total > 0 else None
    return out


def log_to_mlflow(result: dict[str, Any], opts: StreamOptions) -> str:
    """One MLflow run with the options as params and the numbers as `stream.*` metrics, in its
    own experiment: `oitools.compare` reads every top-level run of the pipeline's experiment as
    a pipeline job."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    from oipipe.core.tracking import experiment_id, sqlite_file

    assert opts.mlflow_uri is not None
    db = sqlite_file(opts.mlflow_uri)
    location = (db.parent / "mlartifacts").as_uri() if db is not None else None
    exp = experiment_id(opts.mlflow_uri, opts.mlflow_experiment, location)
    client = MlflowClient(opts.mlflow_uri)
    run = client.create_run(exp, run_name=f"stream-{Path(opts.model).name}")
    now = int(time.time() * 1000)
    params = {k: v for k, v in asdict(opts).items() if k not in ("mlflow_uri",)}
    numbers = {f"stream.{k}": float(v) for k, v in result.items()
               if isinstance(v, int | float) and not isinstance(v, bool)}
    client.log_batch(run.info.run_id,
                     metrics=[Metric(k, v, now, 0) for k, v in numbers.items()],
                     params=[Param(k, str(v)[:6000]) for k, v in params.items()],
                     tags=[RunTag("kind", "stream"), RunTag("end", str(result["end"])),
                           RunTag("backend", str(result["backend"]))])
    client.set_terminated(run.info.run_id,
                          "FINISHED" if result["end"] in ("eos", "stopped", "max_frames")
                          else "FAILED")
    log.info("MLflow: run %s in experiment %s (%s)", run.info.run_id, opts.mlflow_experiment,
             opts.mlflow_uri)
    return run.info.run_id


# --- the loop ------------------------------------------------------------------------------------


def load_model(target: Path) -> tuple[Any, dict]:
    from oipipe.deploy.runtime import load_artifact

    runtime, meta = load_artifact(target)  # a broken artifact is an InputError naming it
    missing = [k for k in ("classes", "input_size", "mean", "std", "crop_pct") if k not in meta]
    if missing:
        raise InputError(f"{target}: its metadata lacks {missing}; not an artifact of the "
                         "pipeline")
    return runtime, meta


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def run(opts: StreamOptions) -> dict[str, Any]:
    """Classify every frame of the stream (or the newest ones, when dropping) until it ends.
    Returns the summary; `--stats` and `--mlflow` get it too, also when the stream fails."""
    opts.check()
    runtime, meta = load_model(opts.model)
    log.info("model %s: %s, %d classes, input %d px", opts.model, meta.get("arch", "?"),
             len(meta["classes"]), meta["input_size"])
    display = Display() if opts.display else None
    stop = threading.Event()
    handlers: dict[int, Any] = {}

    def on_signal(signum: int, _frame: Any) -> None:
        if stop.is_set():  # a second Ctrl-C: no more waiting
            raise KeyboardInterrupt
        log.info("%s: stopping", signal.Signals(signum).name)
        stop.set()

    stats, queue, src, video = Stats(), None, None, None
    end, decode_cpu = "error", 0.0
    try:
        src = open_source(opts)
        if threading.current_thread() is threading.main_thread():
            handlers = {n: signal.signal(n, on_signal) for n in (signal.SIGINT, signal.SIGTERM)}
        end = "stopped"
        if src.wait_ready(opts.stall_timeout, stop):
            drop = src.live if opts.drop == "auto" else opts.drop == "yes"
            # dropping: the newest batch only; not dropping: two batches (one decoded while one
            # is classified)
            queue = FrameQueue(opts.batch if drop else 2 * opts.batch, drop)
            src.start(queue)
            video = VideoOut(opts.out, src.caps["framerate"]) if opts.out else None
            end = classify(opts, runtime, meta, src, queue, video, display, stats, stop)
    except Stalled:
        end = "stall"
        raise
    except KeyboardInterrupt:
        end = "interrupted"
        raise
    finally:
        if queue is not None:
            queue.discard()
        if src is not None:
            decode_cpu = src.close()
        for n, h in handlers.items():
            signal.signal(n, h)
        if video is not None:
            video.close()
        if display is not None:
            display.close()
        result = summary(stats, queue, src, decode_cpu, end, opts)
        if src is not None:
            _report(result, opts)
    return result


def classify(opts: StreamOptions, runtime: Any, meta: dict, src: Any, queue: FrameQueue,
             video: VideoOut | None, display: Display | None, stats: Stats,
             stop: threading.Event) -> str:
    """The model loop, until the queue ends ("eos"), `stop` is set ("stopped") or
    `--max-frames` is reached ("max_frames"); raises what the reader hit, or Stalled."""
    import torch  # the Runtime takes torch tensors (oipipe.deploy.runtime has imported torch)

    classes = list(meta["classes"])
    k = min(opts.topk, len(classes))
    pre = Preprocess.from_meta(meta)
    transforms = [TRANSFORMS[t] for t in opts.transforms]
    while not stop.is_set():
        batch = queue.get(opts.batch, timeout=0.1)
        if batch is None:
            if queue.error is not None:
                raise queue.error
            return "eos"
        if not batch:
            since = src.waiting_since
            if since is not None and time.perf_counter() - since > opts.stall_timeout:
                n = queue.received
                raise Stalled(
                    f"no frame for {opts.stall_timeout:g} s (--stall-timeout) after {n} "
                    "frame(s): the stream stalled" if n else
                    f"no video from the source within {opts.stall_timeout:g} s "
                    "(--stall-timeout): nothing arrives (is the sender running, the address "
                    "and port right?)")
            continue
        with cpu_and_wall(stats, "preprocess"):
            x = runtime.prepare(torch.from_numpy(np.stack([pre(f.image) for f in batch])))
        with cpu_and_wall(stats, "model"):
            t0 = time.perf_counter()
            y = runtime.call(x)
            runtime.sync()
            model_ms = (time.perf_counter() - t0) * 1000
        stats.model_ms.append(model_ms)
        stats.batches += 1
        with cpu_and_wall(stats, "postprocess"):
            probs = softmax(runtime.logits(y))
            for f, p in zip(batch, probs, strict=True):
                top = [(classes[i], float(p[i])) for i in np.argsort(-p)[:k]]
                img = f.image  # drawn on in place: the model has seen it already
                for t in transforms:
                    img = t(img)
                if display is not None or video is not None:
                    img = annotate(img, top, stats.fps_now(),
                                   queue.dropped if queue.drop else None)
                if video is not None:
                    video.write(img)
                if display is not None and not display.show(img):
                    stop.set()
                done = time.perf_counter()
                stats.recent.append(done)
                stats.first_out = done if stats.first_out is None else stats.first_out
                stats.last_out = done
                stats.latency_ms.append((done - f.arrived) * 1000)
                stats.processed += 1
                if opts.json_lines:
                    try:
                        sys.stdout.write(json.dumps({
                            "frame": f.seq, "timestamp": round(f.wall, 6), "label": top[0][0],
                            "score": round(top[0][1], 6),
                            "topk": [[lb, round(sc, 6)] for lb, sc in top],
                            "latency_ms": round((done - f.arrived) * 1000, 3),
                            "model_ms": round(model_ms, 3), "batch": len(batch)}) + "\n")
                        sys.stdout.flush()
                    except BrokenPipeError:  # `| head`: the reader has gone
                        stop.set()
        if opts.max_frames and stats.processed >= opts.max_frames:
            return "max_frames"
    return "stopped"


def _report(result: dict[str, Any], opts: StreamOptions) -> None:
    log.info("%s: %d frames received, %d processed, %d dropped; %s FPS; latency p50/p99 %s/%s "
             "ms, model p50 %s ms; CPU share decode %s%%, model %s%%", result["end"],
             result["frames_received"], result["frames_processed"], result["frames_dropped"],
             result["fps"], result["latency_p50_ms"], result["latency_p99_ms"],
             result["model_p50_ms"], result["decode_share_pct"], result["model_share_pct"])
    if opts.stats is not None:
        from oipipe.core.files import write_json

        write_json(opts.stats, result)
    if opts.mlflow_uri:
        log_to_mlflow(result, opts)


# --- entry point ---------------------------------------------------------------------------------


def mlflow_target(params: Path, uri: str | None, experiment: str | None) -> tuple[str, str]:
    """`--tracking-uri` > MLFLOW_TRACKING_URI > the configured store (`--params`, as the stages
    resolve it); the experiment `--experiment`, else `<tracking.experiment>-stream`."""
    if uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return uri or os.environ["MLFLOW_TRACKING_URI"], experiment or "oi-pipeline-stream"
    from oipipe.core.config import load_params
    from oipipe.core.tracking import tracking_uri

    cfg = load_params(params)
    return tracking_uri(cfg), experiment or f"{cfg.tracking.experiment}-stream"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m oitools.stream",
        description="Classify a live video stream with an artifact of the pipeline.")
    p.add_argument("source", help="a GStreamer pipeline (quoted), a video file, a camera "
                                  "(/dev/video0 or 0) or an rtsp:// or http(s):// URL")
    p.add_argument("--model", type=Path, required=True,
                   help="an artifact: model.onnx/.ts/.pt2, an optimized variant's folder, or the "
                        "train stage's model.pt")
    p.add_argument("--backend", default="auto", help="auto (OpenCV's GStreamer backend when "
                   "it has one), gst-launch or opencv")
    p.add_argument("--batch", type=int, default=1, help="frames per model call, at most")
    p.add_argument("--drop", default="auto", help="drop stale frames: auto (when the source "
                   "is live), yes, no")
    p.add_argument("--topk", type=int, default=3)
    p.add_argument("--transform", action="append", default=[], metavar="NAME",
                   help=f"before display/output, in order: {', '.join(TRANSFORMS)}")
    p.add_argument("--display", action="store_true", help="show a window (q or Esc stops)")
    p.add_argument("--out", type=Path, help="annotated video file (.avi MJPG, .mp4 MPEG-4, "
                   ".mkv FFV1 lossless)")
    p.add_argument("--json", action="store_true", dest="json_lines",
                   help="one JSON line per frame on stdout")
    p.add_argument("--stats", type=Path, help="write the summary as JSON")
    p.add_argument("--stall-timeout", type=float, default=10.0,
                   help="seconds without a frame before giving up (default 10)")
    p.add_argument("--max-frames", type=int, default=0, help="stop after N processed frames")
    p.add_argument("--mlflow", action="store_true", help="log the summary to MLflow")
    p.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else the "
                   "configured one in --params)")
    p.add_argument("--experiment", help="MLflow experiment (default: <tracking.experiment>-"
                   "stream)")
    p.add_argument("--params", type=Path, default=Path("params.yaml"),
                   help="composed config for the MLflow store (default ./params.yaml)")
    args = p.parse_args(argv)

    def work() -> None:
        opts = StreamOptions(
            source=args.source, model=args.model, backend=args.backend, batch=args.batch,
            drop=args.drop, topk=args.topk, transforms=args.transform, display=args.display,
            out=args.out, json_lines=args.json_lines, stats=args.stats,
            stall_timeout=args.stall_timeout, max_frames=args.max_frames)
        if args.mlflow:
            opts.mlflow_uri, opts.mlflow_experiment = mlflow_target(
                args.params, args.tracking_uri, args.experiment)
        run(opts)

    return cli.guarded("stream", work, interrupted="interrupted")


if __name__ == "__main__":
    sys.exit(main())
