"""The prepared dataset as the trainer (and later the evaluators) read it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import pil_to_tensor

from oipipe.core.errors import InputError
from oipipe.core.files import read_csv

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

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        """`key` is an index, or (index, seed) from `SeededSampler`: then the random
        augmentation of this sample is a function of the seed alone, whichever worker (or the
        main process) runs it."""
        i, seed = key if isinstance(key, tuple) else (key, None)
        with Image.open(self.files[i]) as im:
            img = pil_to_tensor(im.convert("RGB"))
        if self.transform is not None:
            if seed is None:
                img = self.transform(img)
            else:
                with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
                    torch.manual_seed(seed)
                    img = self.transform(img)
        return img, self.labels[i]


class SeededSampler(Sampler):
    """A shuffled epoch of (index, augmentation seed) pairs, both derived from (seed, epoch).

    Order and augmentation depend on nothing else: not on the worker count, not on worker
    processes living across epochs, not on a resume in a new process.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        seeds = torch.randint(2**62, (self.n,), generator=g).tolist()
        return iter(zip(order, seeds, strict=True))

    def __len__(self) -> int:
        return self.n


def train_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Transform:
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


def eval_transform(
    size: int, mean: Sequence[float], std: Sequence[float], crop_pct: float = 0.875
) -> v2.Transform:
    return v2.Compose(
        [
            v2.Resize(round(size / crop_pct), antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )
