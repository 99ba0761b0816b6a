"""Image checks and decoding shared by `download` (validate) and `prepare` (decode once)."""

from __future__ import annotations

import io

from PIL import Image, ImageOps, UnidentifiedImageError

# Decompression-bomb guard: Open Images files are at most 1024 px on the longest side.
MAX_PIXELS = 64_000_000


class ImageError(ValueError):
    """Not a complete, decodable JPEG."""


def check_jpeg(data: bytes) -> None:
    """Raise ImageError unless `data` is a whole JPEG that decodes.

    The SOI/EOI markers catch a non-JPEG body (an HTML error page) and most truncations cheaply;
    the full decode catches the rest (a truncated body the server still called complete).
    """
    if not data.startswith(b"\xff\xd8"):
        raise ImageError(f"not a JPEG (starts with {data[:8]!r}, {len(data)} bytes)")
    if b"\xff\xd9" not in data[-64:]:
        raise ImageError(f"truncated JPEG (no end-of-image marker, {len(data)} bytes)")
    decode(data)


def decode(data: bytes | str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode fully, apply the EXIF orientation, return RGB."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            if im.width * im.height > max_pixels:
                raise ImageError(f"{im.width}x{im.height} exceeds {max_pixels} pixels")
            im.load()
            im = ImageOps.exif_transpose(im)
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError(f"cannot decode: {e}") from e


def resize_short_side(im: Image.Image, short: int) -> Image.Image:
    """Resize so the shorter side is `short` px (never upscale past it either way: exact)."""
    w, h = im.size
    scale = short / min(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    # draft() lets libjpeg decode at 1/2..1/8 scale first; here the image is already decoded, so
    # a reducing_gap keeps the quality of a full LANCZOS at a fraction of its cost.
    return im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
