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
import stat
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from tqdm import tqdm

from pipeline import cli, fetch, fsio, paths, sources
from pipeline.errors import UserError
from pipeline.models.catalog import BACKBONES
from pipeline.params import (
    DatasetSpec,
    DownloadParams,
    MirrorSpec,
    Params,
    TransferParams,
)
from pipeline.tracking import StageRun

log = logging.getLogger("download")

EMPTY_CLASS = "empty class folder (no files): not a class"
NOT_A_CLASS = "not a class folder (top-level file or hidden folder)"
_BLOCK = tarfile.BLOCKSIZE
_CHUNK = 1 << 20


RENAMED = "file name is not UTF-8: undecodable bytes written as \\xNN"


def portable_name(name: str) -> str:
    """`name` as UTF-8 text: bytes that are not UTF-8 (kept as surrogates by os and tarfile) become \\xNN,
    so the tar, raw.json and every tool after them (DVC, MLflow, JSON) can carry it."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


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
        self.renamed: list[dict[str, str]] = []
        self._stream: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed by close()/abort()
        self._offset = 0

    def add(self, name: str, size: int, source: BinaryIO) -> None:
        """Copy exactly `size` bytes of `source` in as member `name`; a shorter or longer source is an error."""
        if (portable := portable_name(name)) != name:
            log.warning("%s: %s", portable, RENAMED)
            self.renamed.append({"path": portable, "reason": RENAMED})
            name = portable
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = size, 0o644, 0, 0, 0, "", ""
        header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "strict")
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
        unsorted = self.path.with_name(self.path.name + ".unsorted")  # swept with the tar's temporary when killed
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


LINK_OUTSIDE = "symlink outside the dataset: not read"
BROKEN_LINK = "broken symlink: not read"


def not_regular(mode: int) -> str:
    return f"not a regular file ({fsio.file_kind(mode)}): not read"


def walk_dataset(source: Path) -> tuple[list[tuple[str, Path]], set[str], list[dict[str, str]]]:
    """Every regular file under `source` as (name relative to it, real path to read), every folder's name,
    and the entries not read, with why.

    Links are followed only while they stay inside `source`: a dataset is never a way to read other files
    (a link to /etc/shadow or /dev/zero is listed, not read). Devices, fifos and sockets are listed, never
    opened. A folder link that leads back into its own ancestry is a loop: an error naming it.
    """
    top = source.resolve()
    files: list[tuple[str, Path]] = []
    folders: set[str] = set()
    skipped: list[dict[str, str]] = []

    def visit(real: Path, relative: str, ancestry: frozenset[Path]) -> None:
        for entry in sorted(os.scandir(real), key=lambda e: e.name):
            name = f"{relative}/{entry.name}" if relative else entry.name
            target = Path(entry.path)
            if entry.is_symlink():
                target = target.resolve()
                if not target.is_relative_to(top):
                    skipped.append({"path": name, "reason": LINK_OUTSIDE})
                    continue
                if not target.exists():
                    skipped.append({"path": name, "reason": BROKEN_LINK})
                    continue
            mode = target.lstat().st_mode
            if stat.S_ISDIR(mode):
                if target in ancestry:
                    raise UserError(f"{source / name}: symlink loop (it leads back to {target}): remove the link")
                folders.add(name)
                visit(target, name, ancestry | {target})
            elif stat.S_ISREG(mode):
                files.append((name, target))
            else:
                skipped.append({"path": name, "reason": not_regular(mode)})

    visit(top, "", frozenset({top}))
    return files, folders, skipped


def open_regular(path: Path) -> BinaryIO:
    """`path` opened for reading only if it is (still) a regular file: a swap for a fifo or link is refused."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise UserError(f"{path}: {not_regular(mode)} (it changed while the dataset was read)")
    return os.fdopen(fd, "rb")


def pack_directory(source: Path, tar: RawTar) -> list[dict[str, str]]:
    """Add every file of every class folder of `source` to `tar`; return the entries left out, with why."""
    files, folders, skipped = walk_dataset(source)
    tops = {name: False for name, _ in files if "/" not in name} | {name: True for name in folders if "/" not in name}
    classes, ignored = _classes_and_ignored(str(source), tops, {name.split("/")[0] for name, _ in files if "/" in name})
    kept = set(classes)
    for entry in skipped:
        if entry["path"].split("/")[0] in kept or "/" not in entry["path"]:
            log.warning("%s/%s: %s", source, entry["path"], entry["reason"])
            ignored.append(entry)
    members = sorted(((name, path) for name, path in files if name.split("/")[0] in kept), key=lambda m: member_order(m[0]))
    for name, path in tqdm(members, desc="pack", unit="file", leave=False, mininterval=2):
        with open_regular(path) as stream:
            tar.add(name, os.fstat(stream.fileno()).st_size, stream)
    return sorted(ignored, key=lambda entry: member_order(entry["path"]))


def pack_archive(
    archive: Path, subdir: str | None, tar: RawTar, key: str, limits: DownloadParams
) -> list[dict[str, str]]:
    """Add the class folders of `archive` (of its folder `subdir`, when given) to `tar`, read in place."""
    tops: dict[str, bool] = {}
    with_files: set[str] = set()
    seen = False
    for member in tqdm(fetch.members(archive, only=subdir, limits=limits), desc="pack", unit="member", leave=False, mininterval=2):
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
    path: Path, spec: DatasetSpec, tar: RawTar, limits: DownloadParams, mirror: MirrorSpec | None = None
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
    return {"archive_sha256": archive_sha256, "ignored": pack_archive(path, subdir, tar, key, limits)}


def _serve(spec: DatasetSpec, tar: RawTar, scratch: Path, root: Path, limits: DownloadParams) -> dict[str, Any]:
    """Fill `tar` from the first mirror that exists, else from the source; say who served it."""
    where = sources.locate(spec, root)
    if where.mirror is not None:
        log.info("using mirror %s", where.local)
    served = {"served_by": where.served_by, "location": str(where.local) if where.mirror else where.written}
    if where.local is not None:
        return served | _from_local(where.local, spec, tar, limits, where.mirror)
    source = spec.source
    if source == "sklearn:digits":
        return served | {"ignored": pack_encoded(_digits(), tar)}
    if source.startswith("tfds:"):
        return served | {"ignored": pack_encoded(_tfds(source.removeprefix("tfds:"), scratch), tar)}
    archive = scratch / source.rstrip("/").rsplit("/", 1)[-1]
    archive_sha256 = fetch.download(source, archive, spec.checksum, limits)
    if not spec.checksum:
        log.warning("no checksum pinned for %s; pin the one seen now: checksum: %s", source, archive_sha256)
    ignored = pack_archive(archive, spec.subdir, tar, "data.datasets.*.subdir", limits)
    return served | {"archive_sha256": archive_sha256, "ignored": ignored}


def materialise(spec: DatasetSpec, dest: Path, scratch: Path, root: Path, limits: DownloadParams) -> dict[str, Any]:
    """Write the dataset as the tar `dest`; return what raw.json records (all but dataset and source).

    That is who served it (served_by, location, archive_sha256 for an archive), the entries left out
    (`ignored`) and renamed (`renamed`), with why, the count per class (`classes`) and every member in tar
    order (`files`).
    On an error `dest` is removed (main() also writes it through fsio.atomic_file, so an old tar survives).
    """
    scratch.mkdir(parents=True, exist_ok=True)
    tar = RawTar(dest)
    try:
        served = _serve(spec, tar, scratch, root, limits)
        files = tar.close()
    except BaseException:
        tar.abort()
        dest.unlink(missing_ok=True)
        raise
    classes: dict[str, int] = {}
    for entry in files:
        label = entry["path"].split("/", 1)[0]
        classes[label] = classes.get(label, 0) + 1
    return served | {"renamed": tar.renamed, "classes": dict(sorted(classes.items())), "files": files}


def weights_mirror(backbone: str, mirrors: Iterable[MirrorSpec], root: Path) -> Path | None:
    """The first of `backbone`'s weights mirrors that is a file, verified as a dataset mirror is; None if none is.

    A mirror with its own checksum is checked against it; a plain path is a byte-identical copy of the file
    Keras downloads, checked against the catalog's checksum. A mismatch is an error, not a skip: a file that
    is there but wrong is not silently replaced by another source.
    """
    for mirror in mirrors:
        local = paths.resolve_local(mirror.path, root)
        if not local.is_file():
            log.info("weights mirror %s is not a file: skipped", local)
            continue
        origin = BACKBONES[backbone].notop_weights
        checksum = mirror.checksum if mirror.own("checksum") else (origin[1] if origin else None)
        try:
            sha256 = fetch.verify(local, checksum, f"weights mirror {local}")
        except fetch.DownloadError as exc:
            hint = "" if mirror.own("checksum") else (
                f"; a file that is not Keras' own (re-saved, converted) pins its own: {{path, checksum}} under "
                f"transfer.weights_mirrors.{backbone}"
            )
            raise UserError(f"{exc}{hint}") from None
        if not checksum:
            log.warning("no checksum pinned for weights mirror %s; pin the one seen now: checksum: %s", local, sha256)
        return local
    return None


def resolve_weights(
    transfer: TransferParams, dest: Path, scratch: Path, root: Path, limits: DownloadParams
) -> dict[str, Any]:
    """Put the backbone's weights file (if any) in `dest`; return what weights.json records."""
    record: dict[str, Any] = {"backbone": transfer.backbone, "weights": transfer.weights, "file": None}
    if transfer.weights == "none":
        return record | {"served_by": "none"}
    if transfer.weights == "imagenet":
        mirror = weights_mirror(transfer.backbone, transfer.weights_mirrors.get(transfer.backbone, []), root)
        origin = BACKBONES[transfer.backbone].notop_weights
        if mirror is not None:
            source, served = mirror, "mirror"
        elif origin is not None:
            source, served = scratch / origin[0].rsplit("/", 1)[-1], "origin"
            fetch.download(origin[0], source, origin[1], limits)
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
        "sha256": fsio.file_digest(dest / source.name),
        "bytes": source.stat().st_size,
        "served_by": served,
        "location": str(source) if served != "origin" else BACKBONES[transfer.backbone].notop_weights[0],
    }


@cli.stage("download", trains=False)
def main(params: Params, run: StageRun) -> None:
    root = paths.workspace_root()
    spec = params.data.spec
    with fsio.atomic_file(paths.RAW) as raw:
        listing = materialise(spec, raw, paths.DOWNLOADS, root, params.download)
    # The dataset's shot pattern travels with its files: preprocess groups by it, and re-runs only when it changes.
    manifest = {"dataset": params.data.dataset, "source": spec.source, "group_pattern": spec.group_pattern, **listing}
    fsio.write_json(paths.RAW_MANIFEST, manifest)
    with fsio.atomic_dir(paths.WEIGHTS) as weights_dir:
        weights = resolve_weights(params.transfer, weights_dir, paths.DOWNLOADS, root, params.download)
        fsio.write_json(weights_dir / "weights.json", weights)

    run.images = len(listing["files"])
    run.set_tags({"data.served_by": listing["served_by"], "weights.served_by": weights["served_by"]})
    run.record({
        "files": len(listing["files"]),
        "classes": len(listing["classes"]),
        "bytes": sum(f["bytes"] for f in listing["files"]),
        "ignored": len(listing["ignored"]),
        "renamed": len(listing["renamed"]),
    })
    run.log_artifact(paths.RAW_MANIFEST)
    log.info("%d files in %d classes from %s", len(listing["files"]), len(listing["classes"]), listing["location"])


if __name__ == "__main__":
    main()
