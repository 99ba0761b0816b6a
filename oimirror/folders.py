"""A mirror of real photos: a class-per-folder photo set laid out as Open Images serves it.

`PHOTOS/<class>/<image>.jpg` (torchvision's ImageFolder layout) becomes the same files the
synthetic generator writes: the class tables, per-split label and image-ID CSVs, and every photo,
byte for byte, as `{split}/{ImageID}.jpg`. Each folder must be named after an Open Images class
(any case), so the download stage finds it by the same name it would ask the real sources for.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oimirror.generate import split_counts
from oimirror.layout import (
    IMAGE_ID_HEADER,
    IMAGES_DIR,
    LABEL_HEADER,
    METADATA_DIR,
    SPLITS,
    clear_trees,
    write_class_files,
    write_csv,
    write_manifest,
)
from oipipe.core.errors import InputError
from oipipe.data import imaging, openimages
from oipipe.data.openimages import IMAGE_ID_FILES, LABEL_FILES
from oipipe.data.photos import folder_classes


@dataclass
class _Photo:
    path: Path
    source: str  # relative to the photo folder, with "/"
    cls: str  # the Open Images display name
    sha256: str
    image_id: str = ""
    split: str = ""
    size: int = 0
    md5: str = ""  # base64 of the binary MD5, as Open Images' OriginalMD5


def class_folders(photos: Path, classes: Sequence[str] | None) -> dict[str, str]:
    """Folder name -> Open Images display name, for `classes` (folder names) or every folder.

    Raises InputError naming the folder (and the closest class names) when a folder is not an
    Open Images class, or the photo folder has no class folders.
    """
    found = folder_classes(photos, classes or ())  # the download stage's own rule
    try:
        names = openimages.resolve_classes(found)
    except InputError as e:
        raise InputError(
            f"--from-folders {photos}: each class folder must be named after an "
            f"Open Images class: {e}"
        ) from None
    return dict(zip(found, names, strict=True))


def _files(folder: Path) -> Iterator[Path]:
    """Every file under `folder`, recursively, sorted; hidden files and folders skipped."""
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(f for f in filenames if not f.startswith(".")):
            yield Path(dirpath, name)


def _read(ph: _Photo) -> bytes:
    """The photo's bytes, which must still be the ones first read (a photo edited meanwhile
    would put unchecked bytes in the mirror)."""
    data = ph.path.read_bytes()
    if hashlib.sha256(data).hexdigest() != ph.sha256:
        raise InputError(f"{ph.path} changed while the mirror was being written; run again")
    return data


def generate_from_folders(
    out: Path,
    photos: Path,
    classes: Sequence[str] | None = None,
    images_per_class: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Lay the photo set `photos` out under `out` as an Open Images mirror; return its manifest.

    Every photo keeps its bytes. A file named by a 16-hex Open Images ImageID keeps that ID;
    any other gets the first 16 hex digits of its SHA-256. Per class, a seeded shuffle picks up
    to `images_per_class` photos (all by default) and splits them 70/15/15 into the official
    train/validation/test splits. Files that are not whole JPEGs (Open Images serves nothing
    else) and second copies of the same photo are skipped and listed in the manifest; a class
    left with no photo is an error.
    """
    if images_per_class is not None and images_per_class < 1:
        raise InputError(f"--images-per-class must be >= 1, got {images_per_class}")
    out, photos = Path(out), Path(photos)
    folders = class_folders(photos, classes)
    kept: list[_Photo] = []
    skipped: list[dict[str, str]] = []
    first: dict[str, str] = {}  # sha256 -> the first source with these bytes
    ids: dict[str, str] = {}  # ImageID -> its source
    for folder, cls in folders.items():
        files = list(_files(photos / folder))
        if not files:
            raise InputError(
                f"{photos / folder}: empty class folder; add JPEG photos or leave "
                "it out (--classes names the folders to use)"
            )
        unique: list[_Photo] = []
        for f in files:  # in name order, so the first of two copies is the one kept
            source = f.relative_to(photos).as_posix()
            try:
                digest = hashlib.sha256(f.read_bytes()).hexdigest()
            except OSError as e:
                skipped.append(
                    {"source": source, "class": cls, "reason": f"unreadable: {e.strerror or e}"}
                )
                continue
            if digest in first:
                skipped.append(
                    {
                        "source": source,
                        "class": cls,
                        "reason": f"duplicate: same bytes as {first[digest]}",
                    }
                )
                continue
            first[digest] = source
            unique.append(_Photo(f, source, cls, digest))
        # Seeded per class, so choosing other folders never changes this one's sample.
        random.Random(f"{seed}:{cls}").shuffle(unique)
        chosen: list[_Photo] = []
        for ph in unique:
            if images_per_class is not None and len(chosen) >= images_per_class:
                break
            try:
                data = _read(ph)
                # The check the download stage makes on every body: what passes here, passes.
                imaging.check_jpeg(data)
            except (OSError, imaging.ImageError) as e:
                reason = e.strerror if isinstance(e, OSError) and e.strerror else e
                skipped.append(
                    {"source": ph.source, "class": cls, "reason": f"unreadable: {reason}"}
                )
                continue
            stem = ph.path.stem
            ph.image_id = (
                stem if openimages.is_image_id(stem) and stem not in ids else (ph.sha256[:16])
            )
            if ph.image_id in ids:  # two different photos, one ID: never silently overwrite
                raise InputError(
                    f"{ph.source} and {ids[ph.image_id]} both map to ImageID "
                    f"{ph.image_id}; rename one"
                )
            ids[ph.image_id] = ph.source
            ph.size, ph.md5 = len(data), base64.b64encode(hashlib.md5(data).digest()).decode()
            chosen.append(ph)
        if not chosen:
            why = next(s["reason"] for s in skipped if s["class"] == cls)
            raise InputError(
                f"{photos / folder}: no whole JPEG among its {len(files)} file(s) (first: {why})"
            )
        start = 0
        for split, n in split_counts(len(chosen)).items():
            for ph in chosen[start : start + n]:
                ph.split = split
            start += n
        kept.extend(chosen)

    meta, bucket = clear_trees(out)
    table = write_class_files(meta)
    for ph in kept:
        (bucket / ph.split / f"{ph.image_id}.jpg").write_bytes(_read(ph))
    labels = {name: table[name] for name in folders.values()}
    rnd = random.Random(seed)
    for split in SPLITS:
        in_split = sorted((ph for ph in kept if ph.split == split), key=lambda p: p.image_id)
        rows = [[ph.image_id, "verification", labels[ph.cls], "1"] for ph in in_split]
        rnd.shuffle(rows)  # the real files are not grouped by class either
        write_csv(meta / LABEL_FILES[split], LABEL_HEADER, rows)
        write_csv(
            meta / IMAGE_ID_FILES[split], IMAGE_ID_HEADER, [_image_id_row(ph) for ph in in_split]
        )

    manifest: dict[str, Any] = {
        "source": str(photos.resolve()),
        "seed": seed,
        "images_per_class": images_per_class,
        "metadata_dir": METADATA_DIR,
        "images_dir": IMAGES_DIR,
        "classes": labels,
        "folders": {cls: folder for folder, cls in folders.items()},
        "downloadable": {
            cls: [
                {"id": ph.image_id, "split": ph.split, "source": ph.source}
                for ph in kept
                if ph.cls == cls
            ]
            for cls in folders.values()
        },
        "skipped": skipped,
        "skip_reasons": dict(Counter(s["reason"].split(":", 1)[0] for s in skipped)),
        # What the synthetic mirror adds as faults; a mirror of real photos has none.
        "missing": [],
        "not_jpeg": [],
        "truncated": [],
        "multi_class": [],
    }
    write_manifest(out, manifest)
    return manifest


def _image_id_row(ph: _Photo) -> list[str]:
    """The image-ID CSV row: the photo itself is the "original", so its size and MD5 are true;
    the source path stands in for the title. Author, license and URLs are unknown, left empty."""
    return [ph.image_id, ph.split, "", "", "", "", "", ph.source, str(ph.size), ph.md5, "", ""]
