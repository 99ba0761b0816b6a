"""Image checks and decoding shared by `download` (validate) and `prepare` (decode once)."""

from __future__ import annotations

import io

from PIL import Image, ImageOps, UnidentifiedImageError

# Decompression-bomb guard: Open Images files are at most 1024 px on the longest side, and a
# 48-megapixel phone photo (8000x6000) still fits.
MAX_PIXELS = 64_000_000

# File extension per Pillow format, for storing an image under a name that says what it is. MPO
# (a camera's multi-picture file) is a JPEG with extra frames: any JPEG reader opens it.
EXTENSIONS = {
    "JPEG": ".jpg",
    "MPO": ".jpg",
    "PNG": ".png",
    "WEBP": ".webp",
    "GIF": ".gif",
    "BMP": ".bmp",
    "TIFF": ".tif",
}


class ImageError(ValueError):
    """Not a complete, decodable image."""


class NotAnImage(ImageError):
    """Pillow recognises no image format in the file at all (a text file, HEIC without a
    plugin), as opposed to a recognised image that fails to decode (truncated, corrupt)."""


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
    return _decode(data, max_pixels)[0]


def check_image(data: bytes, max_pixels: int = MAX_PIXELS) -> str:
    """Raise ImageError (NotAnImage when no format is recognised) unless `data` decodes exactly
    as `decode` (what `prepare` does) would; returns the file extension of its format."""
    fmt = _decode(data, max_pixels)[1]
    return EXTENSIONS.get(fmt, f".{fmt.lower()}")


def _decode(data: bytes | str, max_pixels: int) -> tuple[Image.Image, str]:
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            if im.width * im.height > max_pixels:
                raise ImageError(f"{im.width}x{im.height} exceeds {max_pixels} pixels")
            fmt = im.format or "unknown"
            im.load()
            return ImageOps.exif_transpose(im).convert("RGB"), fmt
    except UnidentifiedImageError as e:
        # Pillow's own message holds an object address: not a stable thing to write to a file
        what = f"{len(data)} bytes, starts with {data[:8]!r}" if isinstance(data, bytes) else data
        raise NotAnImage(f"no image format Pillow can read ({what})") from e
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError(f"cannot decode: {e}") from e


def resize_short_side(im: Image.Image, short: int) -> Image.Image:
    """Resize so the shorter side is `short` px (never upscale past it either way: exact)."""
    w, h = im.size
    scale = short / min(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    # draft() lets libjpeg decode at 1/2..1/8 scale first; here the image is already decoded, so
    # a reducing_gap keeps the quality of a full LANCZOS at a fraction of its cost.
    return im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
