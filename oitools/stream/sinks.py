"""Frames out: the display transformations, the annotation, the video file and the window."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from oipipe.core.errors import InputError

log = logging.getLogger("oitools.stream")

# cv2.VideoWriter's codec per file extension: MJPG (every frame a JPEG, plays anywhere), MPEG-4
# part 2 for .mp4 (no H.264 encoder in the PyPI wheel), FFV1 for .mkv (lossless)
VIDEO_CODECS = {".avi": "MJPG", ".mp4": "mp4v", ".mkv": "FFV1"}
WINDOW = "oi-pipeline stream"


# --- display transformations ---------------------------------------------------------------------


def _gray(img: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)


def _edges(img: np.ndarray) -> np.ndarray:
    # Canny's usual 1:2 hysteresis pair on 8-bit grey
    return cv2.cvtColor(
        cv2.Canny(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), 100, 200), cv2.COLOR_GRAY2BGR
    )


TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "gray": _gray,
    "flip": lambda img: cv2.flip(img, 1),  # left-right, a mirror (what a webcam preview does)
    "vflip": lambda img: cv2.flip(img, 0),  # upside down
    "edges": _edges,
}


# --- frames out ----------------------------------------------------------------------------------


def annotate(
    img: np.ndarray, top: list[tuple[str, float]], fps: float, dropped: int | None
) -> np.ndarray:
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
        cv2.putText(
            img,
            t,
            (round(8 * scale), step * (i + 1)),
            cv2.FONT_HERSHEY_SIMPLEX,
            scale,
            (255, 255, 255),
            thick,
            cv2.LINE_AA,
        )
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
        img = img[: img.shape[0] & ~1, : img.shape[1] & ~1]  # OpenCV's writer wants even sizes
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fourcc = cv2.VideoWriter.fourcc(*VIDEO_CODECS[self.path.suffix.lower()])
            h, w = img.shape[:2]
            self.writer = cv2.VideoWriter(str(self.tmp), fourcc, self.fps, (w, h))
            if not self.writer.isOpened():
                raise InputError(
                    f"cannot write {self.path}: OpenCV has no "
                    f"{VIDEO_CODECS[self.path.suffix.lower()]} writer for "
                    f"{w}x{h}"
                )
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
            raise InputError(
                "--display: this OpenCV has no GUI (opencv-python-headless?); "
                "install opencv-python, or use --out"
            )
        if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            raise InputError(
                "--display needs a display and DISPLAY is not set: run it in a "
                "desktop session, over `ssh -X`, or under `xvfb-run`; or use --out"
            )
        self.opened = False

    def show(self, img: np.ndarray) -> bool:
        if not self.opened:
            # GUI_NORMAL: no Qt toolbar or status bar, just the picture
            cv2.namedWindow(WINDOW, cv2.WINDOW_AUTOSIZE | cv2.WINDOW_GUI_NORMAL)
            self.opened = True
        cv2.imshow(WINDOW, img)
        key = cv2.waitKey(1) & 0xFF
        return (
            key not in (ord("q"), 27) and cv2.getWindowProperty(WINDOW, cv2.WND_PROP_VISIBLE) >= 1
        )

    def close(self) -> None:
        if self.opened:
            cv2.destroyWindow(WINDOW)
            cv2.waitKey(1)
