"""The shard format: round trip, order, labels, joins, streams; damaged or half-written splits never pass as whole."""
import numpy as np
import pytest

from pipeline import imageset
from pipeline.errors import UserError

from .conftest import split_on_disk


def examples(count, shape=(3, 2, 3), seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, *shape), dtype=np.uint8)


def write_in_parts(directory, x, labels, shard_bytes, parts=3):
    """Several write() calls, shards cut wherever the byte budget says."""
    with imageset.SplitWriter(directory, "train", x.shape[1:], x.dtype, shard_bytes=shard_bytes) as writer:
        for chunk in np.array_split(np.arange(len(x)), parts):
            writer.write(x[chunk], labels[chunk], chunk)
    return imageset.load_split(directory, "train")


def test_round_trip_keeps_order_labels_and_index_across_shards(tmp_path):
    x, labels = examples(23), np.arange(23) % 4
    record_bytes = imageset.record_dtype(x.shape[1:], x.dtype).itemsize
    split = write_in_parts(tmp_path, x, labels, shard_bytes=5 * record_bytes)
    assert [s.count for s in split.shards] == [5, 5, 5, 5, 3]
    assert all(s.path.stat().st_size == s.count * record_bytes for s in split.shards)
    assert split.count == 23 and split.shape == (3, 2, 3) and split.dtype == np.uint8
    batches = list(split.batches(4))
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), x)
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), labels)
    np.testing.assert_array_equal(split.labels, labels)
    np.testing.assert_array_equal(split.rows["index"], np.arange(23))
    np.testing.assert_array_equal(split.take([22, 0, 7]), x[[22, 0, 7]])


def test_float_features_round_trip(tmp_path):
    features = np.random.default_rng(0).normal(size=(9, 5)).astype(np.float32)
    split = split_on_disk(tmp_path, features, np.zeros(9))
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in split.batches(4)]), features)


def test_stream_yields_every_record_once_in_order_or_shuffled(tmp_path):
    x = np.arange(40, dtype=np.uint8)[:, None] * np.ones((1, 3), np.uint8)  # example i holds value i
    record_bytes = imageset.record_dtype((3,), np.uint8).itemsize
    split = write_in_parts(tmp_path, x, np.arange(40) % 2, shard_bytes=7 * record_bytes)

    ordered = [(xb.numpy(), yb.numpy()) for xb, yb in imageset.stream(split, 8)]
    values = np.concatenate([xb[:, 0] for xb, _ in ordered]).astype(int)
    assert values.tolist() == list(range(40))
    assert np.concatenate([yb for _, yb in ordered]).tolist() == (np.arange(40) % 2).tolist()
    assert ordered[0][0].dtype == np.float32

    def one_epoch(seed):
        return np.concatenate([xb.numpy()[:, 0] for xb, _ in imageset.stream(split, 8, shuffle_seed=seed)]).astype(int)

    shuffled = one_epoch(1)
    assert sorted(shuffled.tolist()) == list(range(40)) and shuffled.tolist() != list(range(40))
    assert one_epoch(1).tolist() == shuffled.tolist()  # seeded


def test_stream_copies_repeat_each_record_per_pass(tmp_path):
    split = split_on_disk(tmp_path, examples(6), np.arange(6) % 2)
    seen = sum(len(y) for _, y in imageset.stream(split, 4, shuffle_seed=0, copies=3))
    assert seen == 18


def test_joined_streams_both(tmp_path):
    first = split_on_disk(tmp_path / "a", examples(4), [0, 1, 0, 1])
    second = split_on_disk(tmp_path / "b", examples(3, seed=1), [1, 1, 1])
    both = imageset.joined(first, second)
    assert both.count == 7 and both.labels.tolist() == [0, 1, 0, 1, 1, 1, 1]
    assert sum(len(y) for _, y in imageset.stream(both, 2, shuffle_seed=0)) == 7
    with pytest.raises(UserError, match="cannot join"):
        imageset.joined(first, split_on_disk(tmp_path / "c", examples(2, shape=(1, 1, 3)), [0, 1]))


def test_interrupted_write_leaves_nothing(tmp_path):
    x = examples(10)
    record_bytes = imageset.record_dtype(x.shape[1:], x.dtype).itemsize
    with pytest.raises(KeyboardInterrupt):
        with imageset.SplitWriter(tmp_path, "train", x.shape[1:], x.dtype, shard_bytes=4 * record_bytes) as writer:
            writer.write(x, np.zeros(10), np.arange(10))
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="train.json is missing"):
        imageset.load_split(tmp_path, "train")


def test_deleted_or_truncated_shard_is_an_error_naming_it(tmp_path):
    x = examples(10)
    record_bytes = imageset.record_dtype(x.shape[1:], x.dtype).itemsize
    split = write_in_parts(tmp_path, x, np.zeros(10), shard_bytes=4 * record_bytes)
    second = split.shards[1].path
    with second.open("r+b") as cut:
        cut.truncate(record_bytes * 2 + 5)
    with pytest.raises(UserError, match=rf"{second.name} has {record_bytes * 2 + 5} bytes, expected"):
        imageset.load_split(tmp_path, "train")
    second.unlink()
    with pytest.raises(UserError, match=rf"{second.name} is missing"):
        imageset.load_split(tmp_path, "train")


def test_an_empty_split_streams_nothing(tmp_path):
    """augment.copies=0 gives an empty augmented split: streams of it (features, joins) must just be empty."""
    with imageset.SplitWriter(tmp_path, "train", (4, 4, 3), np.uint8):
        pass
    empty = imageset.load_split(tmp_path, "train")
    assert empty.count == 0 and empty.shards == ()
    assert list(imageset.stream(empty, 8)) == [] and list(imageset.stream(empty, 8, shuffle_seed=0)) == []
