"""The on-disk example sets passed between stages, streamed so that memory stays flat as they grow.

A set is a directory; each split in it is a few large shard files of fixed-size records (the layout
of CIFAR-10's binary release), which `tf.data.FixedLengthRecordDataset` streams without Python in the
loop and numpy reads with plain file reads. DVC is slow on many small files: these are few and large.

    <dir>/classes.json              ["paper", "rock", ...]; a label is an index into it
    <dir>/manifest.json             (preprocess) where every source file went: a split and row, or quarantine
    <dir>/<split>.json              record shape and dtype, count, and each shard's file, count and bytes
    <dir>/<split>_rows.npy          (label, index) of every record, in record order: small, read whole
    <dir>/<split>-NNNNN.rec         records: int32 label, int32 index, then the example's bytes

An example is a uint8 image (H, W, 3) in prepared/augmented sets and a float32 vector in the
features set. `index` is the record's row in the split it came from (an augmented copy points at its
original), so a subset or a preview can follow an example back to its source.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from pipeline import fsio
from pipeline.errors import UserError

SHARD_BYTES = 256 * 2**20  # a few hundred MB: few files for DVC, and shards to interleave at scale
SHUFFLE_BYTES = 128 * 2**20  # the training stream's shuffle buffer; preprocess already wrote each split shuffled
ROWS = np.dtype([("label", "<i4"), ("index", "<i4")])


def record_dtype(shape: Sequence[int], dtype: str | np.dtype) -> np.dtype:
    return np.dtype([("label", "<i4"), ("index", "<i4"), ("x", np.dtype(dtype).newbyteorder("<"), tuple(shape))])


@dataclass(frozen=True)
class Shard:
    path: Path
    count: int


@dataclass(frozen=True)
class Split:
    """A split on disk (or several joined): its shards, record layout and (label, index) rows."""

    shards: tuple[Shard, ...]
    shape: tuple[int, ...]
    dtype: np.dtype
    rows: np.ndarray  # ROWS, one per record, in record order

    @property
    def labels(self) -> np.ndarray:
        return self.rows["label"]

    @property
    def count(self) -> int:
        return len(self.rows)

    @property
    def record(self) -> np.dtype:
        return record_dtype(self.shape, self.dtype)

    def __len__(self) -> int:
        return self.count

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """The records in order, `batch_size` at a time (the last batch may be short); fields label/index/x."""
        record = self.record
        for shard in self.shards:
            with shard.path.open("rb") as stream:
                for start in range(0, shard.count, batch_size):
                    yield _read(stream, record, min(batch_size, shard.count - start), shard.path)

    def take(self, positions: Sequence[int]) -> np.ndarray:
        """The examples at these record positions (a few: previews, thumbnails), read by seeking."""
        record = self.record
        bounds = np.cumsum([0] + [s.count for s in self.shards])
        out = np.empty((len(positions), *self.shape), dtype=self.dtype)
        for i, position in enumerate(positions):
            shard_number = int(np.searchsorted(bounds, position, side="right")) - 1
            shard = self.shards[shard_number]
            with shard.path.open("rb") as stream:
                stream.seek((position - int(bounds[shard_number])) * record.itemsize)
                out[i] = _read(stream, record, 1, shard.path)["x"][0]
        return out


def _read(stream: Any, record: np.dtype, count: int, path: Path) -> np.ndarray:
    found = np.fromfile(stream, dtype=record, count=count)
    if len(found) != count:
        raise UserError(f"{path} ended early ({len(found)} of {count} records): rebuild it with dvc repro -f")
    return found


def joined(first: Split, second: Split) -> Split:
    """Two splits streamed as one: a train split and its augmented copies."""
    if (first.shape, first.dtype) != (second.shape, second.dtype):
        raise UserError(f"cannot join examples of {first.shape} {first.dtype} with {second.shape} {second.dtype}")
    return Split(first.shards + second.shards, first.shape, first.dtype, np.concatenate([first.rows, second.rows]))


class SplitWriter:
    """Append examples to a split in `directory`; its index files are written when the block ends.

    A block that fails removes what it wrote, so a split exists completely or not at all.
    """

    def __init__(self, directory: Path, name: str, shape: Sequence[int], dtype: str | np.dtype,
                 shard_bytes: int = SHARD_BYTES) -> None:
        self.directory, self.name = Path(directory), name
        self.shape, self.dtype = tuple(int(s) for s in shape), np.dtype(dtype)
        self.record = record_dtype(self.shape, self.dtype)
        self.per_shard = max(1, shard_bytes // self.record.itemsize)
        self.shards: list[dict[str, Any]] = []
        self.rows: list[np.ndarray] = []
        self._stream: Any = None

    def __enter__(self) -> SplitWriter:
        return self

    def write(self, x: np.ndarray, labels: np.ndarray, index: np.ndarray) -> None:
        records = np.empty(len(x), dtype=self.record)
        records["label"], records["index"], records["x"] = labels, index, x
        self.rows.append(records[["label", "index"]].astype(ROWS))
        while len(records):
            if self._stream is None or self.shards[-1]["count"] == self.per_shard:
                self._open_shard()
            room = self.per_shard - self.shards[-1]["count"]
            records[:room].tofile(self._stream)
            self.shards[-1]["count"] += len(records[:room])
            records = records[room:]

    def _open_shard(self) -> None:
        self._close_shard()
        name = f"{self.name}-{len(self.shards):05d}.rec"
        self._stream = (self.directory / name).open("wb")
        self.shards.append({"file": name, "count": 0})

    def _close_shard(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self._close_shard()
        if kind is not None:
            for shard in self.shards:
                (self.directory / shard["file"]).unlink(missing_ok=True)
            return
        for shard in self.shards:
            shard["bytes"] = (self.directory / shard["file"]).stat().st_size
        rows = np.concatenate(self.rows) if self.rows else np.empty(0, ROWS)
        np.save(self.directory / f"{self.name}_rows.npy", rows)
        fsio.write_json(self.directory / f"{self.name}.json", {
            "count": len(rows), "shape": list(self.shape), "dtype": self.dtype.str, "shards": self.shards,
        })


def write_meta(directory: Path, classes: Sequence[str], manifest: Mapping[str, Any]) -> None:
    fsio.write_json(directory / "classes.json", list(classes))
    fsio.write_json(directory / "manifest.json", manifest)


def load_split(directory: Path, name: str) -> Split:
    """Open a split, checking that every shard is there whole: a missing or cut file is an error naming it."""
    directory = Path(directory)
    index_path = directory / f"{name}.json"
    if not index_path.exists():
        raise UserError(f"{index_path} is missing: run the stage that writes {directory} first (dvc repro)")
    try:
        index = json.loads(index_path.read_text())
        rows = np.load(directory / f"{name}_rows.npy")
    except (OSError, ValueError) as exc:
        raise UserError(f"{directory}: the index of split {name!r} is unreadable ({exc}): rebuild it with dvc repro -f") from None
    split = Split(
        tuple(Shard(directory / s["file"], s["count"]) for s in index["shards"]),
        tuple(index["shape"]), np.dtype(index["dtype"]), rows,
    )
    for shard, listed in zip(split.shards, index["shards"]):
        size = shard.path.stat().st_size if shard.path.is_file() else None
        if size != listed["bytes"] or size != shard.count * split.record.itemsize:
            found = "is missing" if size is None else f"has {size} bytes, expected {listed['bytes']}"
            raise UserError(f"{shard.path} {found}: the split is damaged; rebuild it with dvc repro -f")
    if sum(s.count for s in split.shards) != len(rows) or len(rows) != index["count"]:
        raise UserError(f"{directory}: split {name!r} lists {index['count']} records but its files hold another count")
    return split


def load_classes(directory: Path) -> list[str]:
    return fsio.read_json(Path(directory) / "classes.json")


def fingerprint(split: Split, classes: Sequence[str]) -> str:
    """sha256 of a split's records (pixels, labels, order) and class names: equal exactly when two models
    were, or would be, scored on the same examples."""
    digest = hashlib.sha256(json.dumps(list(classes)).encode())
    for shard in split.shards:
        with open(shard.path, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def groups_of(directory: Path, split_name: str, split: Split) -> np.ndarray:
    """The group (shot) of each record of a prepared split, from the manifest, in record order."""
    by_row = {e["row"]: e["group"] for e in load_manifest(directory)["files"] if e.get("split") == split_name}
    return np.array([by_row[int(row)] for row in split.rows["index"]])


def load_manifest(directory: Path) -> dict[str, Any]:
    return fsio.read_json(Path(directory) / "manifest.json")


def streamed(split: Split, keep: np.ndarray | None = None) -> int:
    """How many records of `split` one pass streams when `keep` marks the sources to use."""
    return int(keep[split.rows["index"]].sum()) if keep is not None else split.count


def stream(
    split: Split,
    batch_size: int,
    *,
    shuffle_seed: int | None = None,
    keep: np.ndarray | None = None,
    augmenter: Any = None,
    copies: int = 1,
) -> Any:
    """A tf.data pipeline of (float32 examples, int32 labels) batches, read from the shards as it goes.

    `shuffle_seed` makes it a training stream: shard order and a bounded buffer reshuffled every epoch,
    shards interleaved. `keep` (bool per source index) streams only the records whose `index` it marks.
    `augmenter` (Keras preprocessing layers) runs inside the pipeline on the CPU, so a GPU overlaps it;
    `copies` streams every record that many times per pass, each a fresh augmentation, nothing stored.
    """
    import tensorflow as tf

    record = split.record
    x_bytes = record.itemsize - ROWS.itemsize
    x_type = tf.as_dtype(split.dtype)
    files = tf.data.Dataset.from_tensor_slices(tf.constant([str(s.path) for s in split.shards], dtype=tf.string))
    if shuffle_seed is not None:
        files = files.shuffle(max(1, len(split.shards)), seed=shuffle_seed, reshuffle_each_iteration=True)
    # Training mixes up to 4 shards at a time; any other stream keeps record order (labels line up with rows).
    records = files.interleave(
        lambda path: tf.data.FixedLengthRecordDataset(path, record.itemsize, buffer_size=2**20),
        cycle_length=max(1, min(len(split.shards), 4)) if shuffle_seed is not None else 1, block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True,
    )
    if keep is not None:
        table = tf.constant(keep, dtype=tf.bool)
        records = records.filter(
            lambda r: tf.gather(table, tf.io.decode_raw(tf.strings.substr(r, 4, 4), tf.int32)[0])
        )
    if copies > 1:
        records = records.repeat(copies)
    if shuffle_seed is not None:
        buffer = max(1, min(split.count, SHUFFLE_BYTES // record.itemsize))
        records = records.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=True)

    def decode(batch: Any) -> tuple[Any, Any]:
        labels = tf.io.decode_raw(tf.strings.substr(batch, 0, 4), tf.int32)[:, 0]
        x = tf.io.decode_raw(tf.strings.substr(batch, ROWS.itemsize, x_bytes), x_type)
        return tf.cast(tf.reshape(x, (-1, *split.shape)), tf.float32), labels

    batches = records.batch(batch_size).map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    # Known length: Keras then shows progress totals and never mistakes the end of an epoch for a short input.
    batches = batches.apply(tf.data.experimental.assert_cardinality(-(-copies * streamed(split, keep) // batch_size)))
    if augmenter is not None:
        batches = batches.map(
            lambda x, y: (augmenter(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
    return batches.prefetch(tf.data.AUTOTUNE)
