"""Offline augmentation: seeded, byte-reproducible, streamed shard to shard, and actually changing the images."""
import keras
import numpy as np

from pipeline import imageset
from pipeline.models.layers import build_augmenter
from pipeline.stages.augment import preview_grid, write_copies

from .conftest import split_on_disk


def originals(count=10, size=32):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    images[:, : size // 2, : size // 2] = (255, 0, 0)
    return images


def run(tmp_path, settings, seed, copies=2, name="copies"):
    """Augment originals() on disk; returns (train split, copies split)."""
    train = split_on_disk(tmp_path / "prepared", originals(), np.arange(10) % 3, name="train")
    keras.utils.set_random_seed(seed)
    with imageset.SplitWriter(tmp_path, name, train.shape, np.uint8) as writer:
        write_copies(train, copies, build_augmenter(settings, seed), batch_size=4, writer=writer)
    return train, imageset.load_split(tmp_path, name)


def pixels(split):
    return np.concatenate([b["x"] for b in split.batches(64)]) if split.count else np.empty((0, 32, 32, 3), np.uint8)


def test_same_seed_same_bytes_other_seed_other_bytes(params, tmp_path):
    settings = params.augment
    first, again, other = (pixels(run(tmp_path, settings, seed, name=f"c{i}")[1]) for i, seed in enumerate((1, 1, 2)))
    assert first.dtype == np.uint8 and first.shape == (20, 32, 32, 3)
    assert first.tobytes() == again.tobytes()
    assert first.tobytes() != other.tobytes()


def test_copies_keep_labels_and_point_at_their_source(params, tmp_path):
    train, copies = run(tmp_path, params.augment, 0)
    out = pixels(copies)
    assert not np.array_equal(out[:10], originals())
    assert not np.array_equal(out[:10], out[10:])
    np.testing.assert_array_equal(copies.labels, np.tile(train.labels, 2))
    np.testing.assert_array_equal(copies.rows["index"], np.tile(np.arange(10), 2))


def test_all_transforms_off_is_identity(params, tmp_path):
    off = params.augment.model_copy(update={"flip": "none", "rotation": 0, "zoom": 0, "translation": 0, "contrast": 0})
    np.testing.assert_array_equal(pixels(run(tmp_path, off, 0, copies=1)[1]), originals())


def test_no_copies(params, tmp_path):
    assert run(tmp_path, params.augment, 0, copies=0)[1].count == 0


def test_preview_grid_shows_originals_beside_copies(params, tmp_path):
    train, copies = run(tmp_path, params.augment, 0, copies=3)
    out = pixels(copies)
    grid = preview_grid(train, copies, count=4, per_row=2)
    assert grid.size == (3 * 32, 4 * 32)
    shown = np.asarray(grid)
    np.testing.assert_array_equal(shown[:32, :32], originals()[0])
    np.testing.assert_array_equal(shown[:32, 32:64], out[0])
    np.testing.assert_array_equal(shown[96:, 64:], out[10 + 9])  # last row: image 9, copy 1
