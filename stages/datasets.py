"""The prepared dataset as the trainer (and later the evaluators) read it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from stages.config import InputError
from stages.io import read_csv

SPLITS = ("train", "val", "test")


def read_classes(prepared: Path) -> list[str]:
    f = prepared / "labels.txt"
    if not f.is_file():
        raise InputError(f"{f} not found: run the prepare stage first (`dvc repro prepare`)")
    return f.read_text(encoding="utf-8").splitlines()


class PreparedImages(Dataset):
    """One split of `paths.prepared`, decoded (Pillow, libjpeg-turbo) into uint8 CHW tensors.

    torchvision.io's decoders are deprecated since torchvision 0.29, hence Pillow."""

    def __init__(self, prepared: Path, split: str, transform: v2.Transform | None = None):
        index = prepared / f"{split}.csv"
        if not index.is_file():
            raise InputError(f"{index} not found: run the prepare stage first")
        rows = read_csv(index)
        self.files = [prepared / r["file"] for r in rows]
        self.labels = [int(r["label"]) for r in rows]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.files[i]) as im:
            img = torch.from_numpy(np.asarray(im.convert("RGB"))).permute(2, 0, 1)
        return (self.transform(img) if self.transform else img), self.labels[i]


def train_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Transform:
    return v2.Compose([
        v2.RandomResizedCrop(size, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float],
                   crop_pct: float = 0.875) -> v2.Transform:
    return v2.Compose([
        v2.Resize(round(size / crop_pct), antialias=True),
        v2.CenterCrop(size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])
