"""Synthetic Open Images mirror: a generator of the real file layout and a local HTTP server.

`generate` writes, under one folder, the two trees that the real sources serve
(`openimages/` for the metadata base, `open-images-dataset/` for the images base) with the real
paths, headers and CSV formats, filled with small, learnable synthetic images and a few faults
baked in (404s, an HTML page where a JPEG should be and, on request, JPEGs cut short on disk and
so served whole, with a Content-Length that matches). `MirrorServer` serves such a folder on
127.0.0.1 with injectable faults (errors, truncated bodies, hangs, latency) so that a downloader
can be tested against real HTTP.
"""

from __future__ import annotations

import argparse
import base64
import colorsys
import csv
import email.utils
import importlib.resources
import io
import json
import random
import shutil
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from stages import openimages
from stages.openimages import IMAGE_ID_FILES, LABEL_FILES

METADATA_DIR = "openimages"
IMAGES_DIR = "open-images-dataset"
SPLITS = ("train", "validation", "test")
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
IMAGE_LICENSE = "https://creativecommons.org/licenses/by/2.0/"
DEFAULT_CLASSES = ("Zebra", "Sea turtle", "Blue jay")
EXIF_ORIENTATION_TAG = 0x0112

_SHAPES = ("hstripes", "circle", "squares", "triangle", "ring", "cross", "dstripes", "dots")
# Authors and titles deliberately include commas and quotes: readers must use a CSV parser.
_AUTHORS = (
    "Michael Beat",
    "Smith, John",
    'Anna "Annie" Lee',
    "J. R. O'Neil",
    "Studio Nord, Oslo",
    "photos_by_kim",
    'Carlos "El Gato", Jr.',
    "Marie-Claire Dubois",
)
_TITLES = (
    "...die FNF-Kerze",
    "At the zoo, again",
    'The "big" one',
    "IMG_2041",
    "Sunday, 3pm",
    "untitled",
    'Field notes, day 4: "quiet"',
    "Blue hour",
)
_HTML_ERROR = (
    b"<!DOCTYPE html>\n<html><head><title>503 Service Unavailable</title></head>\n"
    b"<body><h1>Service Unavailable</h1><p>The server is temporarily unable to service your "
    b"request. Please try again later.</p></body></html>\n"
)


@dataclass
class _Img:
    image_id: str
    split: str
    kind: str  # single | missing | not_jpeg | multi | distractor | truncated
    classes: tuple[str, ...]
    orientation: int | None = None
    size: tuple[int, int] | None = None


def load_class_table() -> list[tuple[str, str]]:
    """Return the bundled 601 (LabelName, DisplayName) rows, in file order."""
    text = _class_file_bytes().decode("utf-8")
    return [(row[0], row[1]) for row in csv.reader(io.StringIO(text)) if row]


def _class_file_bytes() -> bytes:
    resource = importlib.resources.files("stages") / "resources" / "class-descriptions-boxable.csv"
    return resource.read_bytes()


def _resolve_names(names: Sequence[str], table: dict[str, str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in names:
        if name not in table:
            close = [n for n in table if n.lower() == name.lower()]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown {what} {name!r}: not an Open Images boxable class{hint}")
        if name in out:
            raise ValueError(f"{what} {name!r} given twice")
        out[name] = table[name]
    return out


def _split_counts(n: int) -> dict[str, int]:
    if n < 3:
        return {"train": n, "validation": 0, "test": 0}
    val = max(1, round(0.15 * n))
    test = max(1, round(0.15 * n))
    return {"train": n - val - test, "validation": val, "test": test}


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return int(r * 255), int(g * 255), int(b * 255)


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    box: tuple[int, int, int, int],
    color: tuple[int, int, int],
    rnd: random.Random,
) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if shape == "hstripes":
        period = max(6, h // rnd.randint(3, 5))
        for y in range(y0, y1, period):
            draw.rectangle((x0, y, x1, y + period // 2), fill=color)
    elif shape == "dstripes":
        step = max(8, w // 4)
        for off in range(-h, w, step):
            draw.line((x0 + off, y1, x0 + off + h, y0), fill=color, width=max(3, step // 3))
    elif shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "ring":
        draw.ellipse(box, outline=color, width=max(4, min(w, h) // 6))
    elif shape == "squares":
        cell = max(6, min(w, h) // 3)
        for i, x in enumerate(range(x0, x1 - cell // 2, cell)):
            for j, y in enumerate(range(y0, y1 - cell // 2, cell)):
                if (i + j) % 2 == 0:
                    draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=color)
    elif shape == "triangle":
        draw.polygon(((x0 + w // 2, y0), (x1, y1), (x0, y1)), fill=color)
    elif shape == "cross":
        t = max(4, min(w, h) // 4)
        draw.rectangle((x0, y0 + h // 2 - t // 2, x1, y0 + h // 2 + t // 2), fill=color)
        draw.rectangle((x0 + w // 2 - t // 2, y0, x0 + w // 2 + t // 2, y1), fill=color)
    else:  # dots
        r = max(2, min(w, h) // 8)
        for _ in range(6):
            cx, cy = rnd.randint(x0, x1), rnd.randint(y0, y1)
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)


def _paint_class(
    img: Image.Image, k: int, n_classes: int, rnd: random.Random, region: tuple[int, int, int, int]
) -> None:
    """Paint class k's look (background hue + shape) into `region` of `img`."""
    x0, y0, x1, y1 = region
    hue = k / max(1, n_classes) + rnd.uniform(-0.03, 0.03)
    draw = ImageDraw.Draw(img)
    draw.rectangle(
        (x0, y0, x1 - 1, y1 - 1), fill=_hsv(hue, rnd.uniform(0.6, 0.85), rnd.uniform(0.55, 0.8))
    )
    w, h = x1 - x0, y1 - y0
    scale = rnd.uniform(0.45, 0.8)
    sw, sh = max(8, int(w * scale)), max(8, int(h * scale))
    sx = x0 + rnd.randint(0, max(0, w - sw))
    sy = y0 + rnd.randint(0, max(0, h - sh))
    fg = _hsv(hue + 0.5, rnd.uniform(0.15, 0.35), rnd.uniform(0.9, 1.0))
    _draw_shape(draw, _SHAPES[k % len(_SHAPES)], (sx, sy, sx + sw, sy + sh), fg, rnd)


def _render(
    img_spec: _Img,
    class_index: dict[str, int],
    n_classes: int,
    rnd: random.Random,
    nprng: np.random.Generator,
    image_px: tuple[int, int],
) -> bytes:
    lo, hi = image_px
    w = rnd.randint(lo, hi)
    # Width and height always differ, so a 90-degree EXIF rotation is visible in the size.
    gap = max(4, (hi - lo) // 10)
    h = rnd.choice(
        [v for v in range(lo, hi + 1) if abs(v - w) >= gap]
        or [v for v in range(lo, hi + 1) if v != w]
    )
    img = Image.new("RGB", (w, h))
    if img_spec.kind == "distractor":
        draw = ImageDraw.Draw(img)
        grey = rnd.randint(90, 170)
        draw.rectangle((0, 0, w, h), fill=(grey, grey, grey))
        c = (rnd.randint(0, 255), rnd.randint(0, 255), rnd.randint(0, 255))
        draw.ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=c)
    elif img_spec.kind == "multi":
        a, b = (class_index[c] for c in img_spec.classes)
        _paint_class(img, a, n_classes, rnd, (0, 0, w // 2, h))
        _paint_class(img, b, n_classes, rnd, (w // 2, 0, w, h))
    else:
        _paint_class(img, class_index[img_spec.classes[0]], n_classes, rnd, (0, 0, w, h))
    # An upright-orientation marker: a white block in the top-left corner.
    m = max(4, min(w, h) // 8)
    ImageDraw.Draw(img).rectangle((0, 0, m - 1, m - 1), fill=(255, 255, 255))
    arr = np.asarray(img, dtype=np.float32) + nprng.normal(0.0, 10.0, (h, w, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    img_spec.size = (w, h)
    buf = io.BytesIO()
    if img_spec.orientation is None:
        img.save(buf, "JPEG", quality=90)
    else:
        # Store the pixels rotated so that only an EXIF-aware decoder sees the upright picture:
        # exif_transpose applies ROTATE_270 for tag 6 and ROTATE_90 for tag 8.
        stored = img.transpose(
            Image.Transpose.ROTATE_90 if img_spec.orientation == 6 else Image.Transpose.ROTATE_270
        )
        exif = Image.Exif()
        exif[EXIF_ORIENTATION_TAG] = img_spec.orientation
        stored.save(buf, "JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


def _image_id_row(img: _Img, rnd: random.Random) -> list[str]:
    user = f"{rnd.choice(('flickr', 'photo', 'wild', 'bird'))}{rnd.randint(100, 99999)}"
    photo = rnd.randint(10**9, 10**10 - 1)
    server = rnd.randint(1000, 9999)
    secret = f"{rnd.getrandbits(40):010x}"
    farm = rnd.randint(1, 9)
    md5 = base64.b64encode(rnd.getrandbits(128).to_bytes(16, "big")).decode()
    thumb = (
        ""
        if rnd.random() < 0.05
        else (
            f"https://c{rnd.randint(1, 8)}.staticflickr.com/{farm}/{server}/{photo}_{secret}_z.jpg"
        )
    )
    return [
        img.image_id,
        img.split,
        f"https://farm{farm}.staticflickr.com/{server}/{photo}_{secret}_o.jpg",
        f"https://www.flickr.com/photos/{user}/{photo}",
        IMAGE_LICENSE,
        f"https://www.flickr.com/people/{user}/",
        rnd.choice(_AUTHORS),
        rnd.choice(_TITLES),
        str(rnd.randint(200_000, 9_000_000)),
        md5,
        thumb,
        "" if rnd.random() < 0.1 else "0.0",
    ]


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _pad_label_file(
    path: Path, target: int, labels: Sequence[str], nprng: np.random.Generator
) -> int:
    """Append positive rows for `labels` with random IDs until `path` is >= target bytes."""
    suffixes = [
        f",{src},{lab},1\n".encode()
        for lab in labels
        for src in ("verification", "crowdsource-verification")
    ]
    avg = 16 + sum(len(s) for s in suffixes) / len(suffixes)
    rows = 0
    with path.open("ab", buffering=16 << 20) as fh:
        size = fh.tell()
        while size < target:
            n = int(min(250_000, (target - size) / avg + 1))
            ids = nprng.bytes(8 * n).hex().encode()
            picks = nprng.integers(0, len(suffixes), n).tolist()
            chunk = b"".join([ids[16 * i : 16 * i + 16] + suffixes[j] for i, j in enumerate(picks)])
            fh.write(chunk)
            size += len(chunk)
            rows += n
    return rows


def generate(
    out: Path,
    classes: Sequence[str] = DEFAULT_CLASSES,
    images_per_class: int = 12,
    seed: int = 0,
    distractor_classes: Sequence[str] = ("Apple", "Banana"),
    label_pad_bytes: int = 0,
    image_px: tuple[int, int] = (96, 200),
    truncated: int = 0,
) -> dict[str, Any]:
    """Write a synthetic Open Images mirror under `out` and return its ground-truth manifest.

    `images_per_class` counts the downloadable single-class images of each class; the faulty
    images (404, not a JPEG) and the multi-class images come on top. Same seed, same bytes.

    `truncated` adds that many train images (classes in turn) stored cut to half their bytes: the
    server sends such a file whole, with a matching Content-Length, so only a check of the JPEG
    itself rejects it. They come last, so a mirror with 0 (the default, which the tests' counts
    assume) is byte for byte the mirror without this option.
    """
    if not classes:
        raise ValueError("at least one class is required")
    if images_per_class < 1:
        raise ValueError("images_per_class must be >= 1")
    if truncated < 0:
        raise ValueError(f"truncated must be >= 0, got {truncated}")
    lo, hi = image_px
    if not 16 <= lo < hi:
        raise ValueError(f"image_px must be (min, max) with 16 <= min < max, got {image_px}")
    out = Path(out)
    table = {name: label for label, name in load_class_table()}
    wanted = _resolve_names(classes, table, "class")
    distract = _resolve_names(distractor_classes, table, "distractor class")
    overlap = set(wanted) & set(distract)
    if overlap:
        raise ValueError(f"classes also given as distractors: {sorted(overlap)}")
    names = list(wanted)
    class_index = {c: i for i, c in enumerate(names)}
    rnd = random.Random(seed)
    nprng = np.random.default_rng(seed)
    used: set[str] = set()

    def new_id() -> str:
        while True:
            image_id = f"{rnd.getrandbits(64):016x}"
            if image_id not in used:
                used.add(image_id)
                return image_id

    images: list[_Img] = []
    for cls in names:
        for split, n in _split_counts(images_per_class).items():
            images.extend(_Img(new_id(), split, "single", (cls,)) for _ in range(n))
        images.append(_Img(new_id(), "train", "missing", (cls,)))
    images.append(_Img(new_id(), "train", "not_jpeg", (names[0],)))
    if len(names) >= 2:
        pair = 0
        for split in SPLITS:
            for _ in range(2):
                a, b = names[pair % len(names)], names[(pair + 1) % len(names)]
                images.append(_Img(new_id(), split, "multi", (a, b)))
                pair += 1
    for cls in distract:
        for split, n in _split_counts(max(3, images_per_class // 3)).items():
            images.extend(_Img(new_id(), split, "distractor", (cls,)) for _ in range(n))
    images.extend(
        _Img(new_id(), "train", "truncated", (names[i % len(names)],)) for i in range(truncated)
    )

    meta, bucket = out / METADATA_DIR, out / IMAGES_DIR
    for tree in (meta, bucket):
        if tree.exists():
            # Stale images from another seed would silently change the mirror's content.
            if not (out / "manifest.json").is_file():
                raise FileExistsError(f"{tree} exists and is not part of a generated mirror")
            shutil.rmtree(tree)
    for split in SPLITS:
        (bucket / split).mkdir(parents=True, exist_ok=True)
    jpeg_count = 0
    for img in images:
        path = bucket / img.split / f"{img.image_id}.jpg"
        if img.kind == "missing":
            continue
        if img.kind == "not_jpeg":
            path.write_bytes(_HTML_ERROR)
            continue
        if img.kind == "truncated":
            # A JPEG missing its second half (and so its end-of-image marker): what a cut-short
            # upload or copy leaves, and what a check of the first bytes alone would accept.
            whole = _render(img, class_index, len(names), rnd, nprng, image_px)
            path.write_bytes(whole[: len(whole) // 2])
            continue
        if jpeg_count % 5 == 2:
            img.orientation = 6 if (jpeg_count // 5) % 2 == 0 else 8
        jpeg_count += 1
        path.write_bytes(_render(img, class_index, len(names), rnd, nprng, image_px))

    # Labels: positives for every image, plus decoys a careless reader would count as positives.
    excluded = set(wanted.values()) | set(distract.values())
    others = [lab for lab in table.values() if lab not in excluded]
    label_rows: dict[str, list[list[str]]] = {s: [] for s in SPLITS}
    decoys: list[dict[str, Any]] = []
    for img in images:
        rows = label_rows[img.split]
        labels = distract if img.kind == "distractor" else wanted
        rows.extend([img.image_id, "verification", labels[c], "1"] for c in img.classes)
        if img.kind != "single":
            continue
        rival = [c for c in names if c != img.classes[0]]
        if rival and rnd.random() < 0.4:
            c = rnd.choice(rival)
            rows.append([img.image_id, "verification", wanted[c], "0"])
            decoys.append(
                {"id": img.image_id, "class": c, "source": "verification", "confidence": "0"}
            )
        if rival and rnd.random() < 0.3:
            c, conf = rnd.choice(rival), rnd.choice(("0.6", "0.7", "0.8", "0.9"))
            rows.append([img.image_id, "machine", wanted[c], conf])
            decoys.append({"id": img.image_id, "class": c, "source": "machine", "confidence": conf})
        if rnd.random() < 0.5:
            rows.append([img.image_id, "machine", rnd.choice(others), "0.8"])
        if rnd.random() < 0.3:
            src = rnd.choice(("verification", "crowdsource-verification"))
            rows.append([img.image_id, src, rnd.choice(others), rnd.choice(("0", "1"))])
    for rows in label_rows.values():
        rnd.shuffle(rows)
    # One malformed train row (3 fields instead of 4) for a requested class.
    bad_pos = rnd.randint(0, len(label_rows["train"]))
    bad_row = [new_id(), "verification", wanted[names[0]]]
    label_rows["train"].insert(bad_pos, bad_row)
    bad_text = ",".join(bad_row)

    meta.joinpath("v5").mkdir(parents=True, exist_ok=True)
    meta.joinpath("v7").mkdir(parents=True, exist_ok=True)
    class_bytes = _class_file_bytes()
    meta.joinpath(CLASS_FILE).write_bytes(class_bytes)
    meta.joinpath(CLASS_FILE_V7).write_bytes(b"LabelName,DisplayName\n" + class_bytes)
    for split in SPLITS:
        _write_csv(meta / LABEL_FILES[split], LABEL_HEADER, label_rows[split])
        id_rows = [
            _image_id_row(img, rnd)
            for img in sorted(images, key=lambda i: i.image_id)
            if img.split == split
        ]
        _write_csv(meta / IMAGE_ID_FILES[split], IMAGE_ID_HEADER, id_rows)
    pad_rows = 0
    if label_pad_bytes > 0:
        pad_rows = _pad_label_file(meta / LABEL_FILES["train"], label_pad_bytes, others, nprng)

    def entry(img: _Img) -> dict[str, Any]:
        return {"id": img.image_id, "split": img.split}

    manifest: dict[str, Any] = {
        "seed": seed,
        "images_per_class": images_per_class,
        "metadata_dir": METADATA_DIR,
        "images_dir": IMAGES_DIR,
        "classes": dict(wanted),
        "distractor_classes": dict(distract),
        "downloadable": {
            c: [
                {**entry(i), "exif_orientation": i.orientation, "size": list(i.size or ())}
                for i in images
                if i.kind == "single" and i.classes[0] == c
            ]
            for c in names
        },
        "missing": [{**entry(i), "class": i.classes[0]} for i in images if i.kind == "missing"],
        "not_jpeg": [{**entry(i), "class": i.classes[0]} for i in images if i.kind == "not_jpeg"],
        "truncated": [{**entry(i), "class": i.classes[0]} for i in images if i.kind == "truncated"],
        "multi_class": [
            {**entry(i), "classes": list(i.classes)} for i in images if i.kind == "multi"
        ],
        "distractors": [
            {**entry(i), "class": i.classes[0]} for i in images if i.kind == "distractor"
        ],
        "decoy_rows": decoys,
        "malformed_row": {"file": LABEL_FILES["train"], "line": bad_pos + 2, "text": bad_text},
        "label_pad_rows": pad_rows,
        "files": {
            p.relative_to(out).as_posix(): p.stat().st_size for p in sorted(meta.rglob("*.csv"))
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


# --------------------------------------------------------------------------------------------
# HTTP server

PathMatch = str | Callable[[str], bool]


class _RangeNotSatisfiable(Exception):
    pass


@dataclass
class _Fault:
    match: Callable[[str], bool]
    kind: str  # fail | truncate
    remaining: int
    status: int = 503
    keep: float = 0.5


def _matcher(path_or_predicate: PathMatch) -> Callable[[str], bool]:
    if callable(path_or_predicate):
        return path_or_predicate
    target = path_or_predicate.lstrip("/")
    return lambda p: p == target


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """Return the inclusive (start, end) of a single byte range; None to ignore the header."""
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None  # unknown unit or multiple ranges: a full 200 is a valid answer
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if first == "":
            suffix = int(last)
            if suffix <= 0 or size == 0:
                raise _RangeNotSatisfiable
            return max(0, size - suffix), size - 1
        start = int(first)
        end = int(last) if last else None
    except ValueError:
        return None
    if start < 0 or (end is not None and end < start):
        return None
    if end is None:
        end = size - 1
    if start >= size:
        raise _RangeNotSatisfiable
    return start, min(end, size - 1)


_CONTENT_TYPES = {".jpg": "image/jpeg", ".csv": "text/csv", ".json": "application/json"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "OpenImagesMirror/1.0"
    timeout = 60  # drop idle keep-alive connections eventually
    # Headers and body go out in separate writes; with Nagle on, a keep-alive client's delayed
    # ACK stalls every response by ~40 ms (measured: 44 ms per GET on loopback without this).
    disable_nagle_algorithm = True

    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _simple(
        self, status: int, body: bytes, head: bool, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _serve(self, head: bool) -> None:
        mirror = self.server.mirror
        rel = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        range_header = self.headers.get("Range")
        mirror._record(rel, head, range_header)
        if mirror._wait(mirror.latency + mirror._delay_for(rel)):
            self.close_connection = True
            return
        fault = None if head else mirror._take_fault(rel)
        if fault is not None and fault.kind == "fail":
            self._simple(fault.status, f"injected {fault.status}\n".encode(), head)
            return
        path = mirror._resolve(rel)
        if path is None:
            self._simple(404, b"Not Found\n", head)
            return
        st = path.stat()
        size = st.st_size
        etag = f'"{size:x}-{st.st_mtime_ns:x}"'
        last_modified = email.utils.formatdate(st.st_mtime, usegmt=True)
        byte_range = None
        if range_header is not None:
            if_range = self.headers.get("If-Range")
            if if_range is None or if_range.strip() in (etag, last_modified):
                try:
                    byte_range = _parse_range(range_header, size)
                except _RangeNotSatisfiable:
                    self._simple(
                        416,
                        b"Range Not Satisfiable\n",
                        head,
                        {"Content-Range": f"bytes */{size}", "ETag": etag},
                    )
                    return
        start, end = byte_range if byte_range else (0, size - 1)
        length = end - start + 1
        self.send_response(206 if byte_range else 200)
        self.send_header(
            "Content-Type", _CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")
        )
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", last_modified)
        if byte_range:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if head or length <= 0:
            return
        if fault is not None and fault.kind == "truncate":
            # The header promised `length` bytes; closing early is what a dropped link looks like.
            length = int(length * fault.keep)
            self.close_connection = True
        with path.open("rb") as fh:
            if length > 0:
                self.connection.sendfile(fh, offset=start, count=length)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a hung (delayed) handler must not block close()
    mirror: MirrorServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return  # clients hanging up (timeouts, truncation tests) are expected
        super().handle_error(request, client_address)


class MirrorServer:
    """Serve a generated mirror folder over HTTP on 127.0.0.1, with injectable faults.

    Starts serving on construction; use as a context manager or call `close()`.
    """

    def __init__(
        self, root: Path, latency: float = 0.0, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"mirror root {self.root} is not a directory")
        self.latency = latency
        self.requests: Counter[str] = Counter()
        self.head_requests: Counter[str] = Counter()
        self.range_requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._faults: list[_Fault] = []
        self._delays: list[tuple[Callable[[str], bool], float]] = []
        self._closing = threading.Event()
        self._httpd = _Server((host, port), _Handler)
        self._httpd.mirror = self
        self.host, self.port = self._httpd.server_address[:2]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"mirror-{self.port}",
            daemon=True,
        )
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    @property
    def metadata_url(self) -> str:
        return f"{self.base_url}{METADATA_DIR}/"

    @property
    def images_url(self) -> str:
        return f"{self.base_url}{IMAGES_DIR}/"

    def fail_first(self, path_or_predicate: PathMatch, times: int = 1, status: int = 503) -> None:
        """Answer the first `times` GETs of matching paths with `status`."""
        with self._lock:
            self._faults.append(_Fault(_matcher(path_or_predicate), "fail", times, status=status))

    def truncate(self, path_or_predicate: PathMatch, times: int = 1, keep: float = 0.5) -> None:
        """Send only `keep` of the body (full Content-Length) on the first `times` GETs."""
        if not 0.0 <= keep < 1.0:
            raise ValueError("keep must be in [0, 1)")
        with self._lock:
            self._faults.append(_Fault(_matcher(path_or_predicate), "truncate", times, keep=keep))

    def delay(self, path_or_predicate: PathMatch, seconds: float) -> None:
        """Add `seconds` before answering matching paths (the latest matching rule wins)."""
        with self._lock:
            self._delays.append((_matcher(path_or_predicate), seconds))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._delays.clear()

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
            self.head_requests.clear()
            self.range_requests.clear()

    def close(self) -> None:
        if self._closing.is_set():
            return
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MirrorServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Called from handler threads.
    def _record(self, rel: str, head: bool, range_header: str | None) -> None:
        with self._lock:
            if head:
                self.head_requests[rel] += 1
                return
            self.requests[rel] += 1
            if range_header is not None:
                self.range_requests.append((rel, range_header))

    def _delay_for(self, rel: str) -> float:
        with self._lock:
            for match, seconds in reversed(self._delays):
                if match(rel):
                    return seconds
        return 0.0

    def _wait(self, seconds: float) -> bool:
        """Sleep, waking early on close; True if the server is closing."""
        if seconds > 0:
            return self._closing.wait(seconds)
        return self._closing.is_set()

    def _take_fault(self, rel: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.remaining > 0 and fault.match(rel):
                    fault.remaining -= 1
                    return fault
        return None

    def _resolve(self, rel: str) -> Path | None:
        try:
            path = (self.root / rel).resolve()
        except (OSError, ValueError):
            return None
        if not path.is_relative_to(self.root) or not path.is_file():
            return None
        return path


# --------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.mirror", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="write a synthetic mirror into OUT")
    gen.add_argument("out", type=Path)
    gen.add_argument(
        "--classes",
        nargs="+",
        default=list(DEFAULT_CLASSES),
        help="display names, e.g. Zebra 'Sea turtle'",
    )
    gen.add_argument("--images-per-class", type=int, default=12)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument(
        "--truncated",
        type=int,
        default=0,
        help="add this many train JPEGs stored cut short (a fault only a full check catches)",
    )
    gen.add_argument(
        "--label-pad-bytes",
        type=int,
        default=0,
        help="pad the train label file to at least this many bytes",
    )
    srv = sub.add_parser("serve", help="serve a generated mirror until Ctrl-C")
    srv.add_argument("root", type=Path)
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8765)
    srv.add_argument("--latency", type=float, default=0.0, help="seconds added to each request")
    args = parser.parse_args(argv)

    if args.command == "generate":
        started = time.perf_counter()
        try:
            manifest = generate(
                args.out,
                classes=args.classes,
                images_per_class=args.images_per_class,
                seed=args.seed,
                label_pad_bytes=args.label_pad_bytes,
                truncated=args.truncated,
            )
        except ValueError as exc:
            parser.error(str(exc))
        n = sum(len(v) for v in manifest["downloadable"].values())
        print(
            f"wrote {args.out} in {time.perf_counter() - started:.1f}s: {n} downloadable "
            f"images, {len(manifest['missing'])} missing, {len(manifest['not_jpeg'])} not "
            f"JPEG, {len(manifest['truncated'])} truncated, "
            f"{len(manifest['multi_class'])} multi-class; manifest "
            f"{args.out / 'manifest.json'}"
        )
        return 0

    if not (args.root / METADATA_DIR).is_dir() or not (args.root / IMAGES_DIR).is_dir():
        parser.error(f"{args.root} has no {METADATA_DIR}/ and {IMAGES_DIR}/: run 'generate' first")
    try:
        server = MirrorServer(args.root, latency=args.latency, host=args.host, port=args.port)
    except OSError as exc:
        parser.error(f"cannot listen on {args.host}:{args.port}: {exc}")
    with server:
        print(f"metadata base: {server.metadata_url}")
        print(f"images base:   {server.images_url}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("stopping", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
