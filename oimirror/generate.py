"""The synthetic mirror: small, learnable images in the real Open Images layout, faults baked in.

Each requested class gets its own look (a background hue and a shape), so a classifier can learn
it in seconds. Besides the downloadable single-class images the mirror holds what the real
sources serve and a downloader must survive: listed images that 404, an HTML page where a JPEG
should be, images with several requested classes, distractor classes, decoy label rows (negatives,
machine labels), one malformed label row, EXIF-rotated JPEGs and, on request, JPEGs cut short on
disk and so served whole with a matching Content-Length.
"""

from __future__ import annotations

import base64
import colorsys
import io
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

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
from oipipe.data import openimages
from oipipe.data.openimages import IMAGE_ID_FILES, LABEL_FILES

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


def split_counts(n: int) -> dict[str, int]:
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


class _Ids:
    """Fresh 64-bit hex image IDs drawn from the mirror's seeded `rnd`, never one twice."""

    def __init__(self, rnd: random.Random) -> None:
        self.rnd, self.used = rnd, set[str]()

    def __call__(self) -> str:
        while True:
            image_id = f"{self.rnd.getrandbits(64):016x}"
            if image_id not in self.used:
                self.used.add(image_id)
                return image_id


def _check(
    classes: Sequence[str], images_per_class: int, truncated: int, image_px: tuple[int, int]
) -> None:
    if not classes:
        raise ValueError("at least one class is required")
    if images_per_class < 1:
        raise ValueError("images_per_class must be >= 1")
    if truncated < 0:
        raise ValueError(f"truncated must be >= 0, got {truncated}")
    lo, hi = image_px
    if not 16 <= lo < hi:
        raise ValueError(f"image_px must be (min, max) with 16 <= min < max, got {image_px}")


def _resolve(
    classes: Sequence[str], distractor_classes: Sequence[str]
) -> tuple[dict[str, str], dict[str, str]]:
    """(wanted, distractors): display name -> label ID each, distinct."""
    wanted = openimages.resolve_classes(classes)
    try:
        distract = openimages.resolve_classes(distractor_classes) if distractor_classes else {}
    except openimages.InputError as e:
        raise openimages.InputError(f"distractor classes: {e}") from None
    overlap = set(wanted) & set(distract)
    if overlap:
        raise ValueError(f"classes also given as distractors: {sorted(overlap)}")
    return wanted, distract


def _plan(
    names: list[str], distract: dict[str, str], images_per_class: int, truncated: int, new_id: _Ids
) -> list[_Img]:
    """Every image the mirror lists, in the order the seeded draws assume."""
    images: list[_Img] = []
    for cls in names:
        for split, n in split_counts(images_per_class).items():
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
        for split, n in split_counts(max(3, images_per_class // 3)).items():
            images.extend(_Img(new_id(), split, "distractor", (cls,)) for _ in range(n))
    images.extend(
        _Img(new_id(), "train", "truncated", (names[i % len(names)],)) for i in range(truncated)
    )
    return images


def _write_images(
    bucket: Path,
    images: list[_Img],
    names: list[str],
    rnd: random.Random,
    nprng: np.random.Generator,
    image_px: tuple[int, int],
) -> None:
    """The image files: none for a missing one, an HTML page for not_jpeg, half a JPEG for a
    truncated one; every fifth JPEG (from the third) carries an EXIF rotation."""
    class_index = {c: i for i, c in enumerate(names)}
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


def _label_rows(
    images: list[_Img],
    wanted: dict[str, str],
    distract: dict[str, str],
    others: list[str],
    rnd: random.Random,
) -> tuple[dict[str, list[list[str]]], list[dict[str, Any]]]:
    """Positives for every image, plus decoys a careless reader would count as positives
    (negatives and machine labels of a requested class, rows of other classes); shuffled."""
    names = list(wanted)
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
    return label_rows, decoys


def _manifest(images: list[_Img], names: list[str]) -> dict[str, Any]:
    """The ground truth of each kind of image, for the tests to check a download against."""

    def entry(img: _Img) -> dict[str, Any]:
        return {"id": img.image_id, "split": img.split}

    def of(kind: str) -> list[dict[str, Any]]:
        return [{**entry(i), "class": i.classes[0]} for i in images if i.kind == kind]

    return {
        "downloadable": {
            c: [
                {**entry(i), "exif_orientation": i.orientation, "size": list(i.size or ())}
                for i in images
                if i.kind == "single" and i.classes[0] == c
            ]
            for c in names
        },
        "missing": of("missing"),
        "not_jpeg": of("not_jpeg"),
        "truncated": of("truncated"),
        "multi_class": [
            {**entry(i), "classes": list(i.classes)} for i in images if i.kind == "multi"
        ],
        "distractors": of("distractor"),
    }


def generate(
    out: Path,
    *,
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
    _check(classes, images_per_class, truncated, image_px)
    out = Path(out)
    wanted, distract = _resolve(classes, distractor_classes)
    names = list(wanted)
    rnd = random.Random(seed)
    nprng = np.random.default_rng(seed)
    new_id = _Ids(rnd)
    images = _plan(names, distract, images_per_class, truncated, new_id)

    meta, bucket = clear_trees(out)
    table = write_class_files(meta)
    _write_images(bucket, images, names, rnd, nprng, image_px)
    excluded = set(wanted.values()) | set(distract.values())
    others = [lab for lab in table.values() if lab not in excluded]
    label_rows, decoys = _label_rows(images, wanted, distract, others, rnd)
    # One malformed train row (3 fields instead of 4) for a requested class.
    bad_pos = rnd.randint(0, len(label_rows["train"]))
    bad_row = [new_id(), "verification", wanted[names[0]]]
    label_rows["train"].insert(bad_pos, bad_row)

    for split in SPLITS:
        write_csv(meta / LABEL_FILES[split], LABEL_HEADER, label_rows[split])
        id_rows = [
            _image_id_row(img, rnd)
            for img in sorted(images, key=lambda i: i.image_id)
            if img.split == split
        ]
        write_csv(meta / IMAGE_ID_FILES[split], IMAGE_ID_HEADER, id_rows)
    pad_rows = 0
    if label_pad_bytes > 0:
        pad_rows = _pad_label_file(meta / LABEL_FILES["train"], label_pad_bytes, others, nprng)

    manifest: dict[str, Any] = {
        "seed": seed,
        "images_per_class": images_per_class,
        "metadata_dir": METADATA_DIR,
        "images_dir": IMAGES_DIR,
        "classes": dict(wanted),
        "distractor_classes": dict(distract),
        **_manifest(images, names),
        "decoy_rows": decoys,
        "malformed_row": {
            "file": LABEL_FILES["train"],
            "line": bad_pos + 2,
            "text": ",".join(bad_row),
        },
        "label_pad_rows": pad_rows,
    }
    write_manifest(out, manifest)
    return manifest
