"""A class-per-folder photo set (`data.source=folder`): which sub-folders are classes, every
file under them, and each file decoded and stored under the hash of its bytes. The download stage
imports with these; the test mirror lays a photo folder out in the Open Images layout with the
same class rule (`oimirror/folders.py`)."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from oipipe.core import progress
from oipipe.core.errors import InputError
from oipipe.core.files import write_bytes
from oipipe.data import imaging


@dataclass
class Photo:
    """One file under a class folder, and what checking it found."""

    source: str  # path relative to data.folder, with "/"
    cls: str
    digest: str = ""  # sha256 of the bytes
    ext: str = ""  # of the decoded format, not of the file name
    error: str = ""  # "undecodable: ..." or "not an image: ..."


def folder_classes(root: Path, wanted: Sequence[str]) -> list[str]:
    """The class sub-folders to import, in label order: `wanted`, or every one sorted by name
    (as ImageFolder does). Hidden folders (`.ipynb_checkpoints`, `.git`) are never classes."""
    if not root.is_dir():
        raise InputError(
            f"data.folder: {root} is not a folder; point data.folder at a "
            "class-per-folder photo set (DIR/<class>/<image>)"
        )
    found = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not found:
        raise InputError(
            f"data.folder: {root} has no class sub-folders; expected "
            "DIR/<class>/<image> (torchvision's ImageFolder layout)"
        )
    if not wanted:
        return found
    unknown = [c for c in wanted if c not in found]
    twice = sorted(c for c, n in Counter(wanted).items() if n > 1)
    if unknown or twice:
        problems = [f"no folder {c!r}" for c in unknown] + [f"{c!r} listed twice" for c in twice]
        raise InputError(
            f"data.classes: {'; '.join(problems)} in {root}; its class folders "
            f"are {found} (or leave data.classes empty for all of them)"
        )
    return list(wanted)


def list_photos(root: Path, classes: Sequence[str]) -> Iterator[Photo]:
    """Every file under each class folder, recursively, in a stable order. Hidden files and
    folders (`.DS_Store`) are skipped; anything else is counted (`Thumbs.db` as not an image)."""
    for cls in classes:
        for dirpath, dirnames, filenames in os.walk(root / cls, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(f for f in filenames if not f.startswith(".")):
                yield Photo(Path(dirpath, name).relative_to(root).as_posix(), cls)


def check_and_store(photo: Photo, root: Path, images: Path) -> Photo:
    """Decode one file as `prepare` will; store the very bytes that decoded under their hash."""
    try:
        data = (root / photo.source).read_bytes()
    except OSError as e:
        photo.error = f"undecodable: cannot read ({e.strerror})"
        return photo
    try:
        photo.ext = imaging.check_image(data)
    except imaging.NotAnImage as e:
        photo.error = f"not an image: {e}"
        return photo
    except imaging.ImageError as e:
        photo.error = f"undecodable: {e}"
        return photo
    photo.digest = hashlib.sha256(data).hexdigest()
    # Written, not hard-linked: what is stored is exactly the bytes that decoded and were hashed
    # (a photo edited after the check cannot slip in), and editing a photo in place later cannot
    # change this DVC output behind DVC's back. Identical bytes (a duplicate) name the same file;
    # the atomic replace makes that race benign.
    write_bytes(images / f"{photo.digest[:16]}{photo.ext}", data)
    return photo


def import_photos(photos: list[Photo], root: Path, images: Path, workers: int) -> list[Photo]:
    # Threads: Pillow releases the GIL while it decodes (as in prepare). map keeps list order.
    with (
        ThreadPoolExecutor(max_workers=max(1, workers)) as pool,
        progress.bar(total=len(photos), unit="img", desc="import") as bar,
    ):
        out, failed = [], 0
        for ph in pool.map(lambda p: check_and_store(p, root, images), photos):
            out.append(ph)
            failed += bool(ph.error)
            bar.update(1)
            bar.set_postfix(skipped=failed, refresh=False)
        return out
