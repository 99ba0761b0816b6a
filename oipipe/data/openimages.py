"""Open Images facts and streaming readers: class names, metadata paths, label and image-ID CSVs.

The label and image-ID CSVs are large (377 MB and 638 MB for train), so every reader here streams
them row by row and keeps only what matches; memory stays flat whatever the file size.
"""

from __future__ import annotations

import csv
import difflib
import io
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from oipipe.core.errors import InputError

CLASS_LIST = "class-descriptions-boxable.csv"
IMAGE_ID_RE = re.compile(r"[0-9a-f]{16}")

# Metadata files relative to the metadata base URL, per official split.
LABEL_FILES = {
    s: f"v5/{s}-annotations-human-imagelabels-boxable.csv" for s in ("train", "validation", "test")
}
IMAGE_ID_FILES = {
    "train": "2018_04/train/train-images-boxable-with-rotation.csv",
    "validation": "2018_04/validation/validation-images-with-rotation.csv",
    "test": "2018_04/test/test-images-with-rotation.csv",
}
LABEL_HEADER = ["ImageID", "Source", "LabelName", "Confidence"]
ATTRIBUTION_FIELDS = [
    "OriginalURL",
    "OriginalLandingURL",
    "License",
    "AuthorProfileURL",
    "Author",
    "Title",
    "Thumbnail300KURL",
]


def is_image_id(s: str) -> bool:
    return IMAGE_ID_RE.fullmatch(s) is not None


def class_table() -> dict[str, str]:
    """DisplayName -> LabelName for the 601 boxable classes (bundled copy, CC BY 4.0)."""
    text = (resources.files("oipipe.data") / "resources" / CLASS_LIST).read_text(encoding="utf-8")
    return {name: label for label, name in csv.reader(io.StringIO(text))}


def resolve_classes(names: Sequence[str]) -> dict[str, str]:
    """Map requested display names (any case) to {DisplayName: LabelName}, in request order.

    Fails before anything is fetched, naming every unknown class and the closest valid names.
    """
    if not names:
        raise InputError("data.classes is empty: name at least one Open Images class")
    table = class_table()
    by_lower = {k.lower(): k for k in table}
    out: dict[str, str] = {}
    problems = []
    for raw in names:
        name = by_lower.get(str(raw).strip().lower())
        if name is None:
            close = difflib.get_close_matches(str(raw).strip().lower(), by_lower, n=3, cutoff=0.6)
            hint = (
                f"did you mean {', '.join(repr(by_lower[c]) for c in close)}?"
                if close
                else "see oipipe/data/resources/class-descriptions-boxable.csv"
            )
            problems.append(f"unknown class {raw!r}: {hint}")
        elif name in out:
            problems.append(f"class {raw!r} is listed twice")
        else:
            out[name] = table[name]
    if problems:
        raise InputError("; ".join(problems))
    return out


@dataclass
class LabelScan:
    """Verified positives for the wanted labels in one label file, plus what was skipped."""

    positives: dict[str, set[str]] = field(default_factory=dict)  # ImageID -> {LabelName}
    rows: int = 0
    malformed: int = 0
    bad_ids: int = 0


def _lines(path: Path) -> Iterator[bytes]:
    with open(path, "rb", buffering=1 << 20) as f:
        yield from f


def scan_labels(path: Path, labels: Iterable[str]) -> LabelScan:
    """Human-verified positives (Confidence 1) of `labels` in a `*-human-imagelabels-boxable.csv`.

    Label rows never contain quotes or commas inside fields, so a byte-level substring test
    rejects the ~99.9% of rows for other classes before any parsing: the 377 MB train file
    streams in seconds at constant memory.
    """
    wanted = {lab.encode() for lab in labels}
    needles = list(wanted)
    scan = LabelScan()
    lines = _lines(path)
    header = next(lines, b"").strip().decode("utf-8", "replace").split(",")
    if header != LABEL_HEADER:
        raise InputError(f"{path}: header {header} is not {LABEL_HEADER}; is it a label file?")
    for line in lines:
        scan.rows += 1
        if not any(n in line for n in needles):
            continue
        parts = line.rstrip(b"\r\n").split(b",")
        if len(parts) != 4:
            scan.malformed += 1
            continue
        image_id, _source, label, confidence = parts
        if label not in wanted:
            continue
        try:
            positive = float(confidence) == 1.0
        except ValueError:
            scan.malformed += 1
            continue
        if not positive:
            continue
        iid = image_id.decode("ascii", "replace")
        if not is_image_id(iid):
            scan.bad_ids += 1
            continue
        scan.positives.setdefault(iid, set()).add(label.decode())
    return scan


def scan_image_ids(path: Path, wanted: set[str]) -> dict[str, dict[str, str]]:
    """Attribution rows (license, author, URLs) for the wanted ImageIDs of an image-ID CSV.

    Author and Title may be quoted and contain commas, so this uses a real CSV parser.
    """
    found: dict[str, dict[str, str]] = {}
    with open(path, encoding="utf-8", newline="", buffering=1 << 20) as f:
        reader = csv.reader(f)
        header = next(reader, [])
        if "ImageID" not in header:
            raise InputError(f"{path}: no ImageID column in header {header}")
        idx = {name: header.index(name) for name in ATTRIBUTION_FIELDS if name in header}
        id_col = header.index("ImageID")
        for row in reader:
            if len(row) != len(header) or row[id_col] not in wanted:
                continue
            found[row[id_col]] = {name: row[i] for name, i in idx.items()}
    return found
