"""Decode one untrusted image file into an RGB uint8 array, or say exactly why it cannot be used.

Shared by preprocess (members of data/raw.tar, as bytes) and predict (user files, as paths), so both see
images the same way.
"""
from __future__ import annotations

import functools
import io
import os
import stat
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline import fsio
from pipeline.params import ResizeMode

# A file's path, its whole content, or a seekable binary stream holding just the file (read from its start).
ImageSource = Path | str | bytes | bytearray | memoryview | BinaryIO
_WHITE = (255, 255, 255)
# The only Pillow plugins allowed to parse a file: plain raster formats. Any other (EPS runs Ghostscript,
# and dozens of rarely used parsers) never sees the bytes. JPEG's opener also yields MPO (camera JPEGs);
# PPM covers PBM/PGM/PNM; DIB is a BMP without its file header.
ALLOWED = ("JPEG", "PNG", "GIF", "BMP", "DIB", "WEBP", "TIFF", "PPM")


class BadImage(Exception):
    """The file cannot be used as an image; the message is the quarantine reason."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: transparency over white, 16/32-bit scaled (not clipped) to 8-bit."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit PNGs open as I;16 or I; Pillow's own convert("L") would clip everything above 255.
        wide = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), "L")
    if image.mode == "P" or "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, _WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image if image.mode == "RGB" else image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def fit(image: Image.Image, size: int, mode: ResizeMode) -> Image.Image:
    target = (size, size)
    if mode == "stretch":  # what the seeds' image_dataset_from_directory did
        return image.resize(target, Image.Resampling.BILINEAR)
    if mode == "pad":
        return ImageOps.pad(image, target, Image.Resampling.BILINEAR, color=(0, 0, 0))
    return ImageOps.fit(image, target, Image.Resampling.BILINEAR)


def _opened(source: ImageSource) -> tuple[Path | BinaryIO, int]:
    """What Image.open takes, and the file's size. A missing path raises OSError, not BadImage."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(source), memoryview(source).nbytes
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        info = path.stat()  # follows symlinks: a link to /dev/zero is a character device
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block the read, a device never end it
            raise BadImage(f"not a regular file ({fsio.file_kind(info.st_mode)})")
        return path, info.st_size
    size = source.seek(0, io.SEEK_END)
    source.seek(0)  # Image.open reads a stream from its start anyway
    return source, size


@functools.cache
def _lift_pillow_limit() -> None:
    """Turn off Pillow's own decompression-bomb check, once per process, at the first decode.

    It is a module global (MAX_IMAGE_PIXELS, ~89 MP) that fires inside Image.open, before the caller's
    max_pixels is checked: a higher max_pixels could never take effect. max_pixels, checked on the header
    before anything is decoded, is the limit. Never put back: a decode in one thread (the scoring server's,
    the serving bench's) cannot see another thread put it back in the middle.
    """
    Image.MAX_IMAGE_PIXELS = None


def _refused_format(opened: Path | BinaryIO) -> str | None:
    """The format any Pillow plugin recognises the file as, from its header: open() parses, never decodes."""
    try:
        with Image.open(opened) as image:
            return image.format
    except Exception:  # noqa: BLE001 - any parser failure: the file is simply not recognised
        return None


def _open_allowed(opened: Path | BinaryIO) -> Image.Image:
    try:
        return Image.open(opened, formats=ALLOWED)
    except UnidentifiedImageError:
        refused = _refused_format(opened)
        if refused is None:
            raise BadImage("not an image: no decoder recognises the file") from None
        raise BadImage(f"format not allowed: {refused} (allowed: {', '.join(ALLOWED)})") from None


def load_rgb(source: ImageSource, *, max_pixels: int, min_size: int = 1, draft: int | None = None) -> Image.Image:
    """Open, check and decode `source` (a path, bytes or a file object) to an upright RGB image;
    raise BadImage with the reason.

    `draft` lets Pillow's JPEG decoder scale by 1/2..1/8 while decoding, as long as both sides
    stay >= draft: several times faster when the target is much smaller than the photo.
    """
    opened, size = _opened(source)
    if size == 0:
        raise BadImage("empty file (0 bytes)")
    _lift_pillow_limit()
    try:
        # max_pixels is the only limit, checked on the header's size, which bounds what decoding the first
        # (only) frame allocates.
        with _open_allowed(opened) as image:
            width, height = image.size  # from the header: nothing decoded yet
            if width * height > max_pixels:
                raise BadImage(f"decompression bomb: {width}x{height} = {width * height} px > max_pixels {max_pixels}")
            if min(width, height) < min_size:
                raise BadImage(f"too small: {width}x{height}, shorter side < min_size {min_size}")
            if draft and image.format == "JPEG":
                image.draft("RGB", (draft, draft))
            image.load()
            return to_rgb(ImageOps.exif_transpose(image))
    except BadImage:
        raise
    except OSError as exc:
        kind = "truncated" if "truncated" in str(exc).lower() else "corrupt"
        raise BadImage(f"{kind}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure on untrusted bytes is a bad file
        raise BadImage(f"corrupt: {type(exc).__name__}: {exc}") from None


def load_array(
    source: ImageSource, *, size: int, resize: ResizeMode, max_pixels: int, min_size: int = 1
) -> np.ndarray:
    """`source` (a path, bytes or a file object) as a uint8 (size, size, 3) array, ready for a model."""
    image = load_rgb(source, max_pixels=max_pixels, min_size=min_size, draft=size)
    return np.asarray(fit(image, size, resize), dtype=np.uint8)
