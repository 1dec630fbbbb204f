"""Decoding untrusted files: every bad kind gets a reason, every odd-but-valid kind becomes RGB."""
import io
import json
import os
import shlex
import struct
import subprocess
import sys
import warnings
import zlib

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image

from pipeline.images import ALLOWED, BadImage, fit, load_array, load_rgb

from .conftest import write_image

LIMIT = 89_478_485


def encoded(fmt: str) -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format=fmt)
    return buffer.getvalue()


def flipped(data: bytes, start: int, stop: int) -> bytes:
    return data[:start] + bytes(b ^ 0xFF for b in data[start:stop]) + data[stop:]


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height pixels, a few hundred bytes long."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty file"),
        (b"this is a text file, not a picture\n" * 10, "not an image"),
        (encoded("JPEG")[:3000], "truncated"),
        (encoded("PNG")[:5000], "truncated"),
        (flipped(encoded("PNG"), 200, 400), "corrupt"),
        (bomb_png(100_000, 100_000), "decompression bomb"),
    ],
    ids=["zero-byte", "non-image", "truncated-jpeg", "truncated-png", "corrupt-png", "bomb"],
)
def test_bad_files_are_rejected_with_their_reason(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    for source in (path, str(path), content, bytearray(content), io.BytesIO(content)):
        with pytest.raises(BadImage, match=reason):
            load_rgb(source, max_pixels=LIMIT)


def test_path_bytes_and_stream_decode_alike(tmp_path):
    """preprocess decodes tar members from bytes, predict decodes paths: the same pixels either way."""
    for fmt in ("JPEG", "PNG"):
        data = encoded(fmt)
        path = tmp_path / f"image.{fmt.lower()}"
        path.write_bytes(data)
        expected = load_array(path, size=48, resize="pad", max_pixels=LIMIT)
        assert expected.shape == (48, 48, 3)
        with open(path, "rb") as stream:
            for source in (data, memoryview(data), io.BytesIO(data), stream):
                np.testing.assert_array_equal(load_array(source, size=48, resize="pad", max_pixels=LIMIT), expected)


@pytest.mark.parametrize("fmt", [*ALLOWED, "MPO"])
def test_every_allowed_format_decodes(fmt):
    """Each allowlisted format (JPEG and PNG being the ones the other tests use) still opens; MPO via JPEG's opener."""
    image = Image.new("RGB", (30, 20), (10, 200, 30))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"save_all": True, "append_images": [image]} if fmt == "MPO" else {}))
    data = buffer.getvalue()
    with Image.open(io.BytesIO(data)) as written:
        assert written.format == fmt  # really that format, not another one Pillow fell back to

    decoded = load_rgb(data, max_pixels=LIMIT)
    assert decoded.mode == "RGB" and decoded.size == (30, 20)
    assert np.abs(np.asarray(decoded, dtype=int)[10, 15] - (10, 200, 30)).max() <= 8  # JPEG/WEBP are lossy


# A minimal EPS: enough for Pillow's EPS plugin to recognise it, and to run Ghostscript if it were loaded.
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n0 0 moveto 10 10 lineto stroke\nshowpage\n"


def test_formats_outside_the_allowlist_are_refused_without_running_ghostscript(tmp_path, monkeypatch):
    marker = tmp_path / "gs-ran"
    fake = tmp_path / "bin" / "gs"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\ntouch {shlex.quote(str(marker))}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # Pillow caches where gs is: look on PATH again
    path = tmp_path / "figure.jpg"  # the name does not matter, the bytes do
    path.write_bytes(EPS)

    for source in (path, EPS, io.BytesIO(EPS)):
        with pytest.raises(BadImage, match=r"^format not allowed: EPS \(allowed: JPEG, PNG, .*TIFF, PPM\)$"):
            load_rgb(source, max_pixels=LIMIT)
    assert not marker.exists()

    # The probe works: Pillow left to itself runs the fake gs on the same file (which then fails to render).
    with pytest.raises(OSError), Image.open(path) as image:
        image.load()
    assert marker.exists()


def test_max_pixels_governs_above_and_below_pillows_default():
    """Pillow refuses > ~89 MP by itself, inside Image.open; preprocess.max_pixels must be the only limit."""
    buffer = io.BytesIO()
    Image.new("1", (10_000, 9_000), 1).save(buffer, format="PNG")  # 90 MP of white: ~30 kB
    data = buffer.getvalue()
    assert 10_000 * 9_000 > LIMIT  # Pillow's default

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # Pillow's check must not even warn
        image = load_rgb(data, max_pixels=100_000_000)
    assert image.size == (10_000, 9_000) and image.getpixel((9_999, 8_999)) == (255, 255, 255)
    del image
    with pytest.raises(BadImage, match="decompression bomb: 10000x9000 = 90000000 px > max_pixels 1000"):
        load_rgb(data, max_pixels=1000)
    assert Image.MAX_IMAGE_PIXELS is None  # lifted for the process, never put back (see the threads below)


# Run in a fresh interpreter: Pillow's limit is lifted once per process, at its first decode. Pillow's own
# limit is set under the image (64x80 = 5120 px > 2 x 1000: Image.open would raise), so a decode that ran
# while another thread had put the limit back would fail. First two decodes interleaved on purpose (X's ends
# between Y's start and Y's header check: where putting the limit back hurt), then 400 on 8 threads.
THREADS_SCRIPT = """
import io, json, sys, threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

Image.MAX_IMAGE_PIXELS = 1000
from pipeline.images import BadImage, load_rgb

pixels = np.random.default_rng(0).integers(0, 256, (80, 64, 3), dtype=np.uint8)
buffer = io.BytesIO()
Image.fromarray(pixels).save(buffer, format="PNG")
data = buffer.getvalue()


class Paused(io.BytesIO):
    # The first read from byte `at` on says so and waits for `go`.
    def __init__(self, at):
        super().__init__(data)
        self.at, self.reached, self.go = at, threading.Event(), threading.Event()

    def read(self, size=-1):
        if self.tell() >= self.at and not self.reached.is_set():
            self.reached.set()
            self.go.wait(30)
        return super().read(size)


def decode(source, max_pixels=10_000):
    try:
        image = load_rgb(source, max_pixels=max_pixels)
        return "same" if np.array_equal(np.asarray(image), pixels) else "different"
    except BadImage as exc:
        return str(exc)


x, y = Paused(data.index(b"IDAT") + 4), Paused(0)  # x pauses in its pixels, y before its header
with ThreadPoolExecutor(2) as pool:
    first = pool.submit(decode, x)
    x.reached.wait(30)
    second = pool.submit(decode, y)
    y.reached.wait(30)
    x.go.set()
    interleaved = [first.result()]
    y.go.set()
    interleaved.append(second.result())
with ThreadPoolExecutor(8) as pool:  # every other call under a max_pixels that refuses the image
    outcomes = list(pool.map(lambda i: decode(data, 5000 if i % 2 else 10_000), range(400)))
json.dump({"interleaved": interleaved, "outcomes": sorted(set(outcomes)), "limit": Image.MAX_IMAGE_PIXELS}, sys.stdout)
"""


def test_threads_decoding_at_once_each_get_their_own_max_pixels_never_pillows():
    done = subprocess.run([sys.executable, "-c", THREADS_SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "interleaved": ["same", "same"],
        "outcomes": ["decompression bomb: 64x80 = 5120 px > max_pixels 5000", "same"],
        "limit": None,
    }


def test_a_missing_path_is_an_os_error_not_a_bad_image(tmp_path):
    """predict reports a missing file as `cannot read`, apart from bad images."""
    with pytest.raises(FileNotFoundError):
        load_rgb(tmp_path / "absent.jpg", max_pixels=LIMIT)


def test_too_small_and_over_limit(tmp_path):
    path = write_image(tmp_path / "small.png", size=(20, 60))
    with pytest.raises(BadImage, match="too small: 20x60"):
        load_rgb(path, max_pixels=LIMIT, min_size=32)
    with pytest.raises(BadImage, match="decompression bomb: 20x60 = 1200 px > max_pixels 1000"):
        load_rgb(path, max_pixels=1000)


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((40, 80, 3), dtype=np.uint8)
    pixels[:, :40] = (255, 0, 0)  # left half red, right half blue
    pixels[:, 40:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: viewers rotate 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    upright = np.asarray(load_rgb(path, max_pixels=LIMIT))
    assert upright.shape == (80, 40, 3)
    assert upright[5, 20, 0] > 200 and upright[5, 20, 2] < 60  # red now on top
    assert upright[75, 20, 2] > 200 and upright[75, 20, 0] < 60  # blue at the bottom


def test_modes_become_rgb(tmp_path):
    rgba = Image.new("RGBA", (40, 40), (0, 0, 255, 0))  # fully transparent blue -> white
    rgba.save(tmp_path / "rgba.png")
    Image.new("LA", (40, 40), (0, 0)).save(tmp_path / "la.png")
    Image.new("L", (40, 40), 77).save(tmp_path / "gray.png")
    palette = Image.new("P", (40, 40), 3)
    palette.putpalette([0, 0, 0, 10, 20, 30, 40, 50, 60, 200, 100, 50] + [0] * 756)
    palette.save(tmp_path / "palette.png")
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # pure red ink
    Image.fromarray(np.full((40, 40), 65535, dtype=np.uint16)).save(tmp_path / "sixteen.png")
    Image.fromarray(np.full((40, 40), 32896, dtype=np.uint16)).save(tmp_path / "sixteen_mid.png")

    def pixel(name):
        image = load_rgb(tmp_path / name, max_pixels=LIMIT)
        assert image.mode == "RGB" and image.size == (40, 40)
        return tuple(int(v) for v in np.asarray(image)[20, 20])

    assert pixel("rgba.png") == (255, 255, 255)
    assert pixel("la.png") == (255, 255, 255)
    assert pixel("gray.png") == (77, 77, 77)
    assert pixel("palette.png") == (200, 100, 50)
    red = pixel("cmyk.jpg")
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    assert pixel("sixteen.png") == (255, 255, 255)  # scaled, not clipped
    assert pixel("sixteen_mid.png") == (128, 128, 128)


@pytest.mark.parametrize("mode", ["stretch", "pad", "center_crop"])
def test_resize_modes(tmp_path, mode):
    wide = Image.new("RGB", (200, 100), (0, 200, 0))
    out = np.asarray(fit(wide, 50, mode))
    assert out.shape == (50, 50, 3)
    corner_is_black = tuple(out[0, 0]) == (0, 0, 0)
    assert corner_is_black == (mode == "pad")


def test_draft_decoding_keeps_the_result_close(tmp_path):
    path = write_image(tmp_path / "big.jpg", size=(640, 480))
    fast = load_array(path, size=100, resize="stretch", max_pixels=LIMIT).astype(int)
    with Image.open(path) as image:
        exact = np.asarray(fit(image.convert("RGB"), 100, "stretch")).astype(int)
    assert fast.shape == (100, 100, 3) and fast.dtype == np.int64
    assert np.abs(fast - exact).mean() < 12  # noise image: the hardest case for scaled decoding
