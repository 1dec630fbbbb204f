"""download stage: the chosen dataset -> data/raw.tar (members <class>/<file>), the backbone weights -> data/weights/.

The images travel as ONE uncompressed tar, not as a folder of files: DVC then hashes, caches and checks one
file instead of every image (a no-op `dvc repro` stays fast at 50,000 images), and no archive is unpacked to
disk. The tar is deterministic (members sorted, no times or owners), so the same input gives the same bytes
and DVC hash. data/raw.json lists every member (path, bytes, sha256, offset of its data in the tar), the
count per class, who served the data and the top-level entries left out.

Mirrors (local paths) are tried before the origin, so the stage runs offline where they exist. A mirror
archive is verified against its checksum (its own, or the dataset's when it is a byte-identical copy).
"""
from __future__ import annotations

import hashlib
import io
import itertools
import logging
import os
import shutil
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from tqdm import tqdm

from pipeline import cli, fetch, fsio, paths
from pipeline.errors import UserError
from pipeline.params import DatasetSpec, MirrorSpec, Params, TransferParams
from pipeline.tracking import StageRun

log = logging.getLogger("download")

# Keras' own download locations for ImageNet weights without the classifier top.
KERAS_NOTOP_WEIGHTS = {
    "xception": (
        "https://storage.googleapis.com/tensorflow/keras-applications/xception/"
        "xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "md5:b0042744bf5b25fce3cb969f33bebb97",
    ),
}


EMPTY_CLASS = "empty class folder (no files): not a class"
NOT_A_CLASS = "not a class folder (top-level file or hidden folder)"
_BLOCK = tarfile.BLOCKSIZE
_CHUNK = 1 << 20


def member_order(name: str) -> list[str]:
    """Members are sorted folder by folder (as pathlib sorts paths), so `a/b/c` comes before `a/b.c`."""
    return name.split("/")


class _Slice:
    """The next `size` bytes of `stream`, as a stream of its own (read() returns b"" after them)."""

    def __init__(self, stream: BinaryIO, size: int) -> None:
        self._stream, self._left = stream, size

    def read(self, size: int = -1) -> bytes:
        size = self._left if size < 0 else min(size, self._left)
        block = self._stream.read(size)
        self._left -= len(block)
        return block


class RawTar:
    """Writes the dataset tar: regular-file members only, with fixed headers (mode 0644, mtime 0, uid/gid 0,
    no owner names), and lists each member as it goes: path, bytes, sha256 and the offset of its data.

    Members may come in any order; close() rewrites the tar sorted (and the last of any duplicate name
    kept, as unpacking would) when they did not come sorted, so the output depends only on the content.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.files: list[dict[str, Any]] = []
        self._stream: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed by close()/abort()
        self._offset = 0

    def add(self, name: str, size: int, source: BinaryIO) -> None:
        """Copy exactly `size` bytes of `source` in as member `name`; a shorter or longer source is an error."""
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = size, 0o644, 0, 0, 0, "", ""
        header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        self._stream.write(header)
        offset = self._offset + len(header)
        digest, left = hashlib.sha256(), size
        while left:
            block = source.read(min(left, _CHUNK))
            if not block:
                raise UserError(f"{name}: the source ended after {size - left} of its {size} bytes")
            digest.update(block)
            self._stream.write(block)
            left -= len(block)
        if source.read(1):
            raise UserError(f"{name}: the source holds more than the {size} bytes it announced")
        padding = -size % _BLOCK
        self._stream.write(b"\0" * padding)
        self._offset = offset + size + padding
        self.files.append({"path": name, "bytes": size, "sha256": digest.hexdigest(), "offset": offset})

    def add_bytes(self, name: str, data: bytes) -> None:
        self.add(name, len(data), io.BytesIO(data))

    def _finish(self) -> None:
        end = self._offset + 2 * _BLOCK  # the end-of-archive marker, then padding to a whole record
        self._stream.write(b"\0" * (2 * _BLOCK + -end % tarfile.RECORDSIZE))
        self._stream.close()

    def close(self) -> list[dict[str, Any]]:
        """Finish the tar (sorted); return its members in tar order."""
        self._finish()
        names = [entry["path"] for entry in self.files]
        keys = [member_order(name) for name in names]
        if all(a < b for a, b in itertools.pairwise(keys)):
            return self.files
        last = {entry["path"]: entry for entry in self.files}  # a later duplicate replaces an earlier one
        log.info("members came unsorted: re-writing %s sorted (%d members)", self.path, len(last))
        unsorted = self.path.with_name(self.path.name + ".unsorted")
        os.replace(self.path, unsorted)
        try:
            with open(unsorted, "rb") as source:
                rewritten = RawTar(self.path)
                try:
                    for name in sorted(last, key=member_order):
                        entry = last[name]
                        source.seek(entry["offset"])
                        rewritten.add(name, entry["bytes"], _Slice(source, entry["bytes"]))
                finally:
                    rewritten._finish()
        finally:
            unsorted.unlink()
        self.files = rewritten.files
        return self.files

    def abort(self) -> None:
        self._stream.close()


def _classes_and_ignored(
    where: str, tops: dict[str, bool], with_files: set[str]
) -> tuple[list[str], list[dict[str, str]]]:
    """Top-level entries (name -> is a folder) -> the class folders (non-hidden, holding a file) and the rest, with why.

    A class folder without any file is left out and reported: a class without images must not pass unnoticed.
    """
    classes = sorted(name for name in with_files if tops.get(name) and not name.startswith("."))
    if not classes:
        raise UserError(f"{where} holds no class folders with files (expected {where}/<class>/<image files>)")
    ignored = []
    for name in sorted(tops):
        if name in classes:
            continue
        empty = tops[name] and not name.startswith(".")
        ignored.append({"path": name, "reason": EMPTY_CLASS if empty else NOT_A_CLASS})
        if empty:
            log.warning("%s/%s: %s", where, name, EMPTY_CLASS)
    return classes, ignored


def pack_directory(source: Path, tar: RawTar) -> list[dict[str, str]]:
    """Add every file of every class folder of `source` to `tar`; return the top-level entries left out, with why."""
    entries = sorted(source.iterdir())
    tops = {entry.name: entry.is_dir() for entry in entries}
    files: dict[str, list[Path]] = {}
    for entry in entries:
        if tops[entry.name] and not entry.name.startswith("."):
            found = [path for path in entry.rglob("*") if path.is_file()]
            if found:
                files[entry.name] = found
    classes, ignored = _classes_and_ignored(str(source), tops, set(files))
    members = sorted(
        ((path.relative_to(source).as_posix(), path) for name in classes for path in files[name]),
        key=lambda member: member_order(member[0]),
    )
    for name, path in tqdm(members, desc="pack", unit="file", leave=False, mininterval=2):
        with open(path, "rb") as stream:
            tar.add(name, os.fstat(stream.fileno()).st_size, stream)
    return ignored


def pack_archive(archive: Path, subdir: str | None, tar: RawTar, key: str) -> list[dict[str, str]]:
    """Add the class folders of `archive` (of its folder `subdir`, when given) to `tar`, read in place."""
    tops: dict[str, bool] = {}
    with_files: set[str] = set()
    seen = False
    for member in tqdm(fetch.members(archive, only=subdir), desc="pack", unit="member", leave=False, mininterval=2):
        seen = True
        if not member.name:  # the folder `subdir` itself
            continue
        top, _, rest = member.name.partition("/")
        tops[top] = tops.get(top, False) or bool(rest) or member.stream is None
        if member.stream is not None and rest and not top.startswith("."):
            tar.add(member.name, member.size, member.stream)
            with_files.add(top)
    if subdir and not seen:
        raise UserError(f"{archive} has no folder {subdir!r} ({key})")
    where = f"{archive}:{subdir}" if subdir else str(archive)
    return _classes_and_ignored(where, tops, with_files)[1]


def _digits() -> Iterator[tuple[str, bytes]]:
    """scikit-learn's 8x8 digits (0..16 ink) as grayscale PNGs, one folder per digit."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        png = io.BytesIO()
        Image.fromarray(np.rint(pixels * 255 / 16).astype(np.uint8), "L").save(png, format="PNG")
        yield f"{label}/{index:04d}.png", png.getvalue()


def _tfds(name: str, scratch: Path) -> Iterator[tuple[str, bytes]]:
    """A TensorFlow Datasets dataset, every split, as its original encoded files."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise UserError(
            f"source tfds:{name} needs tensorflow-datasets: pip install -e '.[tfds]', or give a local mirror"
        ) from None
    builder = tfds.builder(name, data_dir=str(scratch / "tfds"))
    builder.download_and_prepare()
    image_key, label_key = builder.info.supervised_keys
    names = builder.info.features[label_key].names
    suffix = "." + (builder.info.features[image_key].encoding_format or "jpeg")
    dataset = builder.as_dataset(
        split="+".join(builder.info.splits), decoders={image_key: tfds.decode.SkipDecoding()}
    )
    for index, example in enumerate(tqdm(tfds.as_numpy(dataset), desc=f"tfds:{name}", unit="img")):
        yield f"{names[int(example[label_key])]}/{index:06d}{suffix}", bytes(example[image_key])


def pack_encoded(files: Iterable[tuple[str, bytes]], tar: RawTar) -> list[dict[str, str]]:
    """Add generated (name, encoded bytes) files to `tar` (in any order: close() sorts)."""
    for name, data in files:
        tar.add_bytes(name, data)
    return []


def _from_local(
    path: Path, spec: DatasetSpec, tar: RawTar, mirror: MirrorSpec | None = None
) -> dict[str, Any]:
    """A local directory or archive: the source, or `mirror` with its own checksum/subdir where it gives them."""
    checksum, subdir = spec.archive_settings(mirror)
    key = "data.datasets.*.mirrors" if mirror is not None and mirror.own("subdir") else "data.datasets.*.subdir"
    if path.is_dir():
        given = [name for name in ("checksum", "subdir") if mirror is not None and mirror.own(name)]
        if given:
            raise UserError(
                f"mirror {path} is a directory but gives {' and '.join(given)}, which only an archive can have "
                "(data.datasets.*.mirrors: a directory mirror is the class-per-folder folder itself)"
            )
        return {"ignored": pack_directory(path, tar)}
    if not fetch.is_archive(path):
        raise UserError(f"{path} is neither a class-per-folder directory nor a .zip/.tar/.tar.gz archive")
    archive_sha256 = fetch.verify(path, checksum, str(path))
    if not checksum:
        log.warning("no checksum pinned for %s; pin the one seen now: checksum: %s", path, archive_sha256)
    return {"archive_sha256": archive_sha256, "ignored": pack_archive(path, subdir, tar, key)}


def _serve(spec: DatasetSpec, tar: RawTar, scratch: Path, root: Path) -> dict[str, Any]:
    """Fill `tar` from the first mirror that exists, else from the source; say who served it."""
    for mirror in spec.mirrors:
        local = paths.resolve_local(mirror.path, root)
        if local.exists():
            log.info("using mirror %s", local)
            served = {"served_by": "mirror", "location": str(local)}
            return served | _from_local(local, spec, tar, mirror)
        log.info("mirror %s not found", local)
    source = spec.source
    served = {"served_by": "origin", "location": source}
    if source == "sklearn:digits":
        return served | {"ignored": pack_encoded(_digits(), tar)}
    if source.startswith("tfds:"):
        return served | {"ignored": pack_encoded(_tfds(source.removeprefix("tfds:"), scratch), tar)}
    if source.startswith(("http://", "https://")):
        archive = scratch / source.rstrip("/").rsplit("/", 1)[-1]
        archive_sha256 = fetch.download(source, archive, spec.checksum)
        if not spec.checksum:
            log.warning("no checksum pinned for %s; pin the one seen now: checksum: %s", source, archive_sha256)
        ignored = pack_archive(archive, spec.subdir, tar, "data.datasets.*.subdir")
        return served | {"archive_sha256": archive_sha256, "ignored": ignored}
    local = paths.resolve_local(source, root)
    if not local.exists():
        raise UserError(f"data source {source!r} not found (looked at {local}) and no mirror exists")
    return served | _from_local(local, spec, tar)


def materialise(spec: DatasetSpec, dest: Path, scratch: Path, root: Path) -> dict[str, Any]:
    """Write the dataset as the tar `dest`; return what raw.json records (all but dataset and source).

    That is who served it (served_by, location, archive_sha256 for an archive), the top-level entries left
    out (`ignored`), the count per class (`classes`) and every member in tar order (`files`).
    On an error `dest` is removed (main() also writes it through fsio.atomic_file, so an old tar survives).
    """
    scratch.mkdir(parents=True, exist_ok=True)
    tar = RawTar(dest)
    try:
        served = _serve(spec, tar, scratch, root)
        files = tar.close()
    except BaseException:
        tar.abort()
        dest.unlink(missing_ok=True)
        raise
    classes: dict[str, int] = {}
    for entry in files:
        label = entry["path"].split("/", 1)[0]
        classes[label] = classes.get(label, 0) + 1
    return served | {"classes": dict(sorted(classes.items())), "files": files}


def resolve_weights(transfer: TransferParams, dest: Path, scratch: Path, root: Path) -> dict[str, Any]:
    """Put the backbone's weights file (if any) in `dest`; return what weights.json records."""
    record: dict[str, Any] = {"backbone": transfer.backbone, "weights": transfer.weights, "file": None}
    if transfer.weights == "none":
        return record | {"served_by": "none"}
    if transfer.weights == "imagenet":
        mirrors = [paths.resolve_local(m, root) for m in transfer.weights_mirrors.get(transfer.backbone, [])]
        found = [mirror for mirror in mirrors if mirror.is_file()]
        if found:
            source, served = found[0], "mirror"
        elif transfer.backbone in KERAS_NOTOP_WEIGHTS:
            url, checksum = KERAS_NOTOP_WEIGHTS[transfer.backbone]
            source, served = scratch / url.rsplit("/", 1)[-1], "origin"
            fetch.download(url, source, checksum)
        else:
            raise UserError(
                f"no ImageNet weights known for transfer.backbone={transfer.backbone!r}: add a file under "
                f"transfer.weights_mirrors.{transfer.backbone}, or set transfer.weights to a weights file path"
            )
    else:
        source, served = paths.resolve_local(transfer.weights, root), "path"
        if not source.is_file():
            raise UserError(f"transfer.weights: {source} is not a file (use imagenet, none or a weights file path)")
    shutil.copyfile(source, dest / source.name)  # keeps the suffix: Keras picks the h5 format by it
    return record | {
        "file": source.name,
        "sha256": fetch.file_digest(dest / source.name),
        "bytes": source.stat().st_size,
        "served_by": served,
        "location": str(source) if served != "origin" else KERAS_NOTOP_WEIGHTS[transfer.backbone][0],
    }


@cli.stage("download", trains=False)
def main(params: Params, run: StageRun) -> None:
    root = paths.workspace_root()
    spec = params.data.spec
    with fsio.atomic_file(paths.RAW) as raw:
        listing = materialise(spec, raw, paths.DOWNLOADS, root)
    manifest = {"dataset": params.data.dataset, "source": spec.source, **listing}
    fsio.write_json(paths.RAW_MANIFEST, manifest)
    with fsio.atomic_dir(paths.WEIGHTS) as weights_dir:
        weights = resolve_weights(params.transfer, weights_dir, paths.DOWNLOADS, root)
        fsio.write_json(weights_dir / "weights.json", weights)

    run.images = len(listing["files"])
    run.set_tags({"data.served_by": listing["served_by"], "weights.served_by": weights["served_by"]})
    run.record({
        "files": len(listing["files"]),
        "classes": len(listing["classes"]),
        "bytes": sum(f["bytes"] for f in listing["files"]),
        "ignored": len(listing["ignored"]),
    })
    run.log_artifact(paths.RAW_MANIFEST)
    log.info("%d files in %d classes from %s", len(listing["files"]), len(listing["classes"]), listing["location"])


if __name__ == "__main__":
    main()
