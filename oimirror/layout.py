"""The Open Images file layout a mirror writes: folders, paths, headers, and the shared writers.

One mirror folder holds the two trees the real sources serve: `openimages/` (the metadata base
URL) and `open-images-dataset/` (the images base URL, `{split}/{ImageID}.jpg`). The per-split
CSV paths and the class table come from `oipipe.data.openimages`, which the download stage reads.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from oipipe.data import openimages

METADATA_DIR = "openimages"
IMAGES_DIR = "open-images-dataset"
MANIFEST = "manifest.json"
SPLITS = tuple(openimages.LABEL_FILES)
CLASS_FILE = "v5/class-descriptions-boxable.csv"
CLASS_FILE_V7 = "v7/oidv7-class-descriptions-boxable.csv"
LABEL_HEADER = tuple(openimages.LABEL_HEADER)
IMAGE_ID_HEADER = (
    "ImageID",
    "Subset",
    "OriginalURL",
    "OriginalLandingURL",
    "License",
    "AuthorProfileURL",
    "Author",
    "Title",
    "OriginalSize",
    "OriginalMD5",
    "Thumbnail300KURL",
    "Rotation",
)


def clear_trees(out: Path) -> tuple[Path, Path]:
    """Return the (metadata, images) trees under `out`, emptied of an earlier generated mirror.

    Stale images from another run would silently change the mirror's content, so an earlier
    mirror is removed whole; a folder that is not one (no manifest) is never touched.
    """
    meta, bucket = out / METADATA_DIR, out / IMAGES_DIR
    for tree in (meta, bucket):
        if tree.exists():
            if not (out / MANIFEST).is_file():
                raise FileExistsError(
                    f"{tree} exists and is not part of a generated mirror; pick an empty folder"
                )
            shutil.rmtree(tree)
    for split in SPLITS:
        (bucket / split).mkdir(parents=True, exist_ok=True)
    return meta, bucket


def write_csv(path: Path, header: Sequence[str] | None, rows: Sequence[Sequence[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        if header is not None:
            writer.writerow(header)
        writer.writerows(rows)


def write_class_files(meta: Path) -> dict[str, str]:
    """Write the v5 (no header) and v7 (with header) class tables; return DisplayName -> Label.

    Written from the table the download stage resolves names against, so the two never differ;
    the v5 file comes out byte for byte the real 601-row file.
    """
    table = openimages.class_table()
    rows = [(label, name) for name, label in table.items()]
    write_csv(meta / CLASS_FILE, None, rows)
    write_csv(meta / CLASS_FILE_V7, ("LabelName", "DisplayName"), rows)
    return table


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """Add the metadata files' sizes to `manifest` and write it as `out/manifest.json`."""
    meta = out / METADATA_DIR
    manifest["files"] = {
        p.relative_to(out).as_posix(): p.stat().st_size for p in sorted(meta.rglob("*.csv"))
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
