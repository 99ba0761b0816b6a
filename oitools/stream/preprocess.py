"""The stream client's preprocessing: what `datasets.eval_transform` does, in numpy and Pillow
(no torchvision), from the artifact's metadata, so a frame is classified as the test images were."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from PIL import Image

log = logging.getLogger("oitools.stream")

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

    def __init__(
        self, input_size: int, mean: Sequence[float], std: Sequence[float], crop_pct: float
    ):
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
        crop = frame[top : top + self.size, left : left + self.size, ::-1]  # BGR -> RGB
        x = crop.transpose(2, 0, 1).astype(np.float32) / 255.0
        return np.ascontiguousarray((x - self.mean) / self.std)
