"""Frames in: the GStreamer sources of the stream client (a `gst-launch-1.0` child writing raw BGR
frames to a pipe, or OpenCV's GStreamer backend), the frame queue between them and the model,
and the errors a pipeline can end with."""

from __future__ import annotations

import ctypes
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
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import cv2
import numpy as np

from oipipe.core.errors import InputError, StageError

if TYPE_CHECKING:
    from oitools.stream.client import StreamOptions


log = logging.getLogger("oitools.stream")

GST_LAUNCH = "gst-launch-1.0"
SINK = "oi_sink"  # the name of the pipeline's last element, whose caps `-v` reports
GST_PACKAGES = (
    "gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good "
    "gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav"
)


class Stalled(StageError):
    """No frame for `--stall-timeout` seconds."""


# --- frames in -----------------------------------------------------------------------------------


@dataclass
class Frame:
    seq: int  # index among the frames received, from 0
    image: np.ndarray  # H x W x 3 BGR uint8
    arrived: float  # time.perf_counter() when the whole frame had been read
    wall: float  # time.time() at the same moment


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
            raise InputError(
                f"no camera at {device} (is it plugged in? `v4l2-ctl --list-devices` lists them)"
            )
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
    return {
        "format": fmt.group(1) if fmt else None,
        "width": int(w.group(1)),
        "height": int(h.group(1)),
        "framerate": int(fps.group(1)) / int(fps.group(2)) if fps and int(fps.group(2)) else 0.0,
    }


# GStreamer's messages that mean the request, not the stream, is wrong (exit code 2)
_USER_ERRORS = (
    "not-negotiated",
    "Could not determine type of stream",
    "No decoder available",
    "missing plugin",
    "Resource not found",
    "No such file",
    "Could not open device",
    "Cannot identify device",
    "not a capture device",
    "cannot decode",
)


def gst_error(
    lines: Sequence[str], returncode: int | None, description: str, before_video: bool = False
) -> Exception:
    """What gst-launch's last lines say went wrong, as the exception the exit code follows:
    InputError for a pipeline that cannot be built or negotiated, a missing element or plugin,
    and (`before_video`) a file or device that gives no video; StageError otherwise."""
    text = "\n".join(lines)
    m = re.search(r'erroneous pipeline: no element "([^"]+)"', text)
    if m:
        el = m.group(1)
        return InputError(
            f"GStreamer has no element {el!r} (a typo, or its plugin is not "
            f"installed: `gst-inspect-1.0 {el}` finds it once it is; Debian: "
            f"apt-get install {GST_PACKAGES})"
        )
    m = re.search(r"erroneous pipeline: (.*)", text)
    if m:
        return InputError(f"malformed GStreamer pipeline {description!r}: {m.group(1).strip()}")
    errors = []
    for i, line in enumerate(lines):
        m = re.match(r"ERROR: from element (\S+): (.*)", line)
        if m:  # the element, its message, and the debug line two below "Additional debug info"
            debug = (
                lines[i + 3].strip()
                if i + 3 < len(lines) and lines[i + 1].startswith("Additional debug info")
                else ""
            )
            errors.append(
                f"{m.group(1).rsplit('/', 1)[-1]}: {m.group(2)}" + (f" ({debug})" if debug else "")
            )
    msg = "; ".join(dict.fromkeys(errors)) or next(
        (ln for ln in reversed(lines) if ln.strip()), f"exit code {returncode}, no message"
    )
    if "not-negotiated" in text:
        return InputError(
            f"the source's output cannot be turned into BGR video (caps not "
            f"negotiated: does {description!r} end in decoded raw video? add a "
            f"decoder, e.g. decodebin): {msg}"
        )
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
            raise InputError(
                f"{GST_LAUNCH} not found on PATH: install GStreamer (Debian: "
                f"apt-get install {GST_PACKAGES})"
            )
        self.description = gst_description(tokens)
        self.kind = kind
        self.caps: dict[str, Any] | None = None
        self.live = False
        self.lines: deque[str] = deque(maxlen=200)
        self.waiting_since: float | None = None  # when the reader began waiting for bytes
        self.queue: FrameQueue | None = None
        self._stop = threading.Event()
        self._started, self._caps_known, self._exited = (
            threading.Event(),
            threading.Event(),
            threading.Event(),
        )
        self._caps_changed: str | None = None
        r, w = os.pipe()
        self._fd = r
        cmd = [
            exe,
            "-v",
            "-f",
            "-X",
            "last-message",
            *tokens,
            "!",
            "videoconvert",
            "!",
            "video/x-raw,format=BGR",
            "!",
            "fdsink",
            f"name={SINK}",
            f"fd={w}",
            "sync=false",
        ]
        log.info("source: %s", self.description)
        log.debug("command: %s", shlex.join(cmd))
        self._rusage0 = _children_cpu()
        try:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                pass_fds=(w,),
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        except OSError:
            os.close(r)
            raise
        finally:
            os.close(w)  # the child's copy is the only writer left: its exit is our end of file
        self._messages = threading.Thread(
            target=self._read_messages, daemon=True, name="gst-messages"
        )
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
                    elif (caps["width"], caps["height"]) != (
                        self.caps["width"],
                        self.caps["height"],
                    ):
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
                    raise InputError(
                        f"the source {self.description!r} ended before any video "
                        "(has it a video stream?)"
                    )
                raise gst_error(
                    list(self.lines),
                    self.proc.returncode,
                    self.description,
                    before_video=self.kind in ("file", "camera"),
                )
            if since is None and self._started.is_set():
                since = time.perf_counter()
            if since is not None and time.perf_counter() - since > stall_timeout:
                raise Stalled(
                    f"no video from the source within {stall_timeout:g} s "
                    "(--stall-timeout): nothing arrives (is the sender running, the "
                    "address and port right?)"
                )
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
        log.info(
            "video %dx%d BGR at %.4g fps (%s, %s)",
            w,
            h,
            self.caps["framerate"],
            self.kind,
            "live" if self.live else "not live",
        )
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
                        raise StageError(
                            f"the source changed its frame size from {w}x{h} to "
                            f"{self._caps_changed} mid-stream: not supported"
                        )
                    rows = np.frombuffer(buf, np.uint8).reshape(h, stride)
                    image = (
                        rows.reshape(h, w, 3)
                        if stride == 3 * w
                        else np.ascontiguousarray(rows[:, : 3 * w].reshape(h, w, 3))
                    )
                    self.queue.put(Frame(seq, image, time.perf_counter(), time.time()), self._stop)
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
                    log.warning("the stream ended inside a frame (%d of %d bytes): dropped", got, n)
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
        self.cap = cv2.VideoCapture(
            f"{self.description} ! videoconvert ! "
            f"video/x-raw,format=BGR ! appsink name={SINK} sync=false "
            "max-buffers=2 drop=false",
            cv2.CAP_GSTREAMER,
        )
        if not self.cap.isOpened():
            raise InputError(
                f"OpenCV's GStreamer backend cannot open {self.description!r} (a "
                "malformed pipeline, a missing element or an unreadable source; "
                "`--backend gst-launch` reports GStreamer's own message)"
            )
        fps = self.cap.get(cv2.CAP_PROP_FPS)
        self.caps: dict[str, Any] | None = {
            "format": "BGR",
            "width": int(self.cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
            "height": int(self.cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
            "framerate": fps if fps and math.isfinite(fps) else 0.0,
        }
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


BACKENDS: dict[str, type[GstLaunchSource] | type[OpenCVSource]] = {
    "gst-launch": GstLaunchSource,
    "opencv": OpenCVSource,
}


def opencv_has_gstreamer() -> bool:
    return bool(re.search(r"GStreamer:\s+YES", cv2.getBuildInformation()))


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


_PR_SET_PDEATHSIG = 1
_prctl: Any
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
        raise InputError(
            "--backend opencv: this OpenCV was built without GStreamer "
            "(cv2.getBuildInformation()); use --backend gst-launch"
        )
    return BACKENDS[backend](tokens, kind)
