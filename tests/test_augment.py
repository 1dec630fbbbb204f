"""Offline augmentation: seeded, byte-reproducible, and actually changing the images."""
import keras
import numpy as np

from pipeline.models.layers import build_augmenter
from pipeline.stages.augment import augment, preview_grid


def originals(count=10, size=32):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    images[:, : size // 2, : size // 2] = (255, 0, 0)
    return images


def run(settings, seed, copies=2):
    keras.utils.set_random_seed(seed)
    return augment(originals(), copies, build_augmenter(settings, seed), batch_size=4)


def test_same_seed_same_bytes_other_seed_other_bytes(params):
    settings = params.augment
    first, again, other = run(settings, 1), run(settings, 1), run(settings, 2)
    assert first.dtype == np.uint8 and first.shape == (20, 32, 32, 3)
    assert first.tobytes() == again.tobytes()
    assert first.tobytes() != other.tobytes()


def test_copies_differ_from_originals_and_each_other(params):
    out = run(params.augment, 0)
    source = originals()
    assert not np.array_equal(out[:10], source)
    assert not np.array_equal(out[:10], out[10:])


def test_all_transforms_off_is_identity(params):
    off = params.augment.model_copy(update={"flip": "none", "rotation": 0, "zoom": 0, "translation": 0, "contrast": 0})
    np.testing.assert_array_equal(run(off, 0, copies=1), originals())


def test_no_copies(params):
    assert run(params.augment, 0, copies=0).shape == (0, 32, 32, 3)


def test_preview_grid_shows_originals_beside_copies(params):
    source = originals()
    copies = run(params.augment, 0, copies=3)
    grid = preview_grid(source, copies, count=4, per_row=2)
    assert grid.size == (3 * 32, 4 * 32)
    pixels = np.asarray(grid)
    np.testing.assert_array_equal(pixels[:32, :32], source[0])
    np.testing.assert_array_equal(pixels[:32, 32:64], copies[0])
    np.testing.assert_array_equal(pixels[96:, 64:], copies[10 + 9])  # last row: image 9, copy 1
