"""What optimize, benchmark (and the stream client) measure accuracy on, and how.

Explicit arguments only (a prepared folder, split names, the artifact's metadata), never the whole
config, so any stage can call it without depending on another stage's settings.

- `images(prepared, splits, meta)`: the held-out images, preprocessed as the artifact expects;
  by default every prepared image the model did not train on (val + test), because one image
  of 37 is 2.7 points and a bar of 0.5 points cannot be decided on so few.
- `calibration_batches(...)`: a seeded sample of training images for int8 calibration.
- `against_fp32(...)`: a variant's logits against the fp32 model's on the same images: accuracy with
  its Wilson interval, the paired difference with its interval, agreement with its interval,
  exact McNemar, and the one-sided verdict against the precision's bar.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from oipipe.core.errors import InputError
from oipipe.data.datasets import PreparedImages, eval_transform
from oipipe.measure.intervals import paired_counts, paired_difference, verdict, wilson

log = logging.getLogger("oipipe.measure.evaluation")


def _transform(meta: dict):
    return eval_transform(meta["input_size"], meta["mean"], meta["std"], meta["crop_pct"])


def images(prepared: Path, splits: Sequence[str], meta: dict) -> tuple[torch.Tensor, np.ndarray]:
    """Every image of `splits` (in that order), preprocessed, and its labels."""
    xs, labels = [], []
    for split in splits:
        ds = PreparedImages(prepared, split, _transform(meta))
        xs += [ds[i][0] for i in range(len(ds))]
        labels += ds.labels
    if not xs:
        raise InputError(
            f"{prepared}: the split(s) {list(splits)} hold no image: nothing to "
            "measure on (raise data.split.ratios for them)"
        )
    return torch.stack(xs), np.asarray(labels, dtype=np.int64)


def fill(images: torch.Tensor, batch: int, offset: int = 0) -> torch.Tensor:
    """`batch` real images from `offset` on, wrapping around a split that holds fewer (never
    padded with anything synthetic)."""
    return images[[(offset + j) % len(images) for j in range(batch)]]


def batches(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [x[i : i + size] for i in range(0, len(x), size)]


def logits(model: torch.nn.Module, batches: Iterable[torch.Tensor]) -> list[np.ndarray]:
    """The fp32 model's logits on each batch, as numpy (the reference every check compares
    against: optimize's accuracy pass, the benchmark's agreement check and its baseline, export)."""
    with torch.no_grad():
        return [model(x).numpy() for x in batches]


def calibration_batches(
    prepared: Path, meta: dict, count: int, batch: int, seed: int = 0
) -> Callable[[], Iterator[torch.Tensor]]:
    """Up to `count` training images (a seeded sample), eval preprocessing, in batches of
    `batch`. `count` is a ceiling: a training split of 108 photos calibrates on all 108 rather
    than stopping the pipeline (the record says how many were used)."""
    ds = PreparedImages(prepared, "train", _transform(meta))
    if len(ds) == 0:
        raise InputError(f"{prepared}/train.csv has no image: nothing to calibrate int8 on")
    if count > len(ds):
        log.warning(
            "optimize.calibration_images=%d but the training split has %d images: "
            "calibrating on all %d",
            count,
            len(ds),
            len(ds),
        )
    count = min(count, len(ds))
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:count].tolist()

    def gen() -> Iterator[torch.Tensor]:
        for i in range(0, count, batch):
            yield torch.stack([ds[j][0] for j in order[i : i + batch]])

    return gen


def top1_with_interval(logits: np.ndarray, labels: np.ndarray, confidence: float = 0.95) -> dict:
    """Top-1 in percent with its Wilson interval and the number of images."""
    k, n = int((logits.argmax(1) == labels).sum()), int(len(labels))
    lo, hi = wilson(k, n, confidence)
    return {
        "top1_pct": round(100 * k / n, 3) if n else None,
        "top1_ci_low_pct": round(100 * lo, 3),
        "top1_ci_high_pct": round(100 * hi, 3),
        "eval_images": n,
    }


def against_fp32(
    fp32: np.ndarray, got: np.ndarray, labels: np.ndarray, bar_pct: float, confidence: float = 0.95
) -> dict:
    """The variant (`got`) against fp32 on the same images; percentages and points."""
    if fp32.shape != got.shape or len(labels) != len(got):
        raise ValueError(f"logits {got.shape} vs fp32 {fp32.shape} on {len(labels)} labels")
    ref_ok, var_ok = fp32.argmax(1) == labels, got.argmax(1) == labels
    p = paired_difference(*paired_counts(ref_ok, var_ok), confidence=confidence)
    v = verdict(p, bar_pct / 100, confidence)
    agree = int((got.argmax(1) == fp32.argmax(1)).sum())
    a_lo, a_hi = wilson(agree, len(labels), confidence)
    ref = top1_with_interval(fp32, labels, confidence)
    return {
        **top1_with_interval(got, labels, confidence),
        "fp32_top1_pct": ref["top1_pct"],
        "fp32_top1_ci_low_pct": ref["top1_ci_low_pct"],
        "fp32_top1_ci_high_pct": ref["top1_ci_high_pct"],
        "top1_delta_pct": round(100 * p.delta, 3),
        "top1_delta_ci_low_pct": round(100 * p.low, 3),
        "top1_delta_ci_high_pct": round(100 * p.high, 3),
        "discordant_worse": p.worse,
        "discordant_better": p.better,
        "mcnemar_p": round(p.mcnemar_p, 6),
        "agreement_pct": round(100 * agree / len(labels), 3),
        "agreement_ci_low_pct": round(100 * a_lo, 3),
        "agreement_ci_high_pct": round(100 * a_hi, 3),
        "accuracy_bar_pct": float(bar_pct),
        "verdict": v.verdict,
        "verdict_reason": v.reason,
        "images_to_decide": v.images_to_decide,
        "max_abs_logit_diff": float(np.abs(got - fp32).max()),
    }
