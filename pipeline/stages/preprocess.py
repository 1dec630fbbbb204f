"""preprocess stage: data/raw.tar -> data/prepared (validated, RGB, resized, split train/val/test).

The members of data/raw.tar are listed by data/raw.json (path, bytes, offset of the data): each is decoded
straight from the tar, which the decoding processes open themselves, so no image is unpacked or copied.

Every file ends in exactly one place: a split, the quarantine list (with its reason) or a dropped
class (with a warning). The split is stratified by class and group-aware: all frames of one shot
(the dataset's `group_pattern`, passed on in data/raw.json) land in the same split, and so do files with the
same bytes, so near-duplicates and copies cannot leak into the test set.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing
import os
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
from tqdm import tqdm

from pipeline import cli, fsio, imageset, paths
from pipeline.errors import UserError
from pipeline.images import BadImage, load_array
from pipeline.params import SPLITS, Params, PreprocessParams
from pipeline.splitting import assign_splits, group_of, merge_duplicates, share_warnings
from pipeline.tracking import StageRun

log = logging.getLogger("preprocess")


def check_class_names(names: list[str]) -> None:
    """`Cat` beside `cat` (or `cat ` beside `cat`) is one class spelled twice, not two: say so."""
    seen: dict[str, str] = {}
    for name in names:
        key = " ".join(name.split()).casefold()
        if key in seen:
            raise UserError(
                f"class folders {seen[key]!r} and {name!r} differ only by case or whitespace: merge or rename one"
            )
        seen[key] = name


def index_of(raw: Path) -> Path:
    """The listing download writes beside the tar: data/raw.tar -> data/raw.json."""
    return raw.with_suffix(".json")


class Member(NamedTuple):
    path: str
    label: str
    offset: int
    size: int
    sha256: str


def list_members(raw: Path) -> tuple[list[Member], re.Pattern[str] | None]:
    """Every member of the tar `raw`, in tar order, from its listing; and the dataset's shot pattern.

    A tar shorter than the listing says (cut short, or not the tar the listing was written with) is an
    error naming the first member it lacks: never a silently shorter dataset.
    """
    index = index_of(raw)
    if not raw.is_file() or not index.is_file():
        raise UserError(f"{raw} or {index} is missing: run the download stage first")
    try:
        listing = fsio.read_json(index)
        found = [
            Member(f["path"], f["path"].split("/", 1)[0], int(f["offset"]), int(f["bytes"]), f["sha256"])
            for f in listing["files"]
        ]
        pattern = re.compile(listing["group_pattern"]) if listing.get("group_pattern") else None
    except (KeyError, TypeError, ValueError, re.error) as exc:
        raise UserError(f"{index} does not list the tar's members with offsets ({exc!r}): run the download stage again") from None
    if not found:
        raise UserError(f"{raw} holds no files in class folders: run the download stage first")
    if any("/" not in member.path for member in found):
        raise UserError(f"{index}: every member must be <class>/<file>; run the download stage again")
    size = raw.stat().st_size
    for member in found:
        if member.offset + member.size > size:
            raise UserError(
                f"{raw} is cut short: it has {size} bytes, but member {member.path!r} ends at byte "
                f"{member.offset + member.size} (per {index}); restore it (`dvc checkout {raw}`) or run the download stage again"
            )
    check_class_names(sorted({member.label for member in found}))
    return found, pattern


_tar: int | None = None  # this process's descriptor of the tar being decoded


def _open_tar(path: str) -> None:
    """A pool initializer: each decoding process opens the tar once and reads members by offset."""
    global _tar
    _tar = os.open(path, os.O_RDONLY)


def _close_tar() -> None:
    global _tar
    if _tar is not None:
        os.close(_tar)
        _tar = None


def read_member(fd: int, offset: int, size: int) -> bytes:
    """`size` bytes from `offset` (fewer only where the file ends first)."""
    parts, done = [], 0
    while done < size:
        block = os.pread(fd, size - done, offset + done)
        if not block:
            break
        parts.append(block)
        done += len(block)
    return b"".join(parts)


def _decode(member: tuple[int, int], settings: PreprocessParams) -> tuple[np.ndarray | None, str | None]:
    offset, size = member
    data = read_member(_tar, offset, size)
    if len(data) < size:
        return None, f"truncated: the tar holds {len(data)} of this member's {size} bytes"
    try:
        return load_array(
            data, size=settings.image_size, resize=settings.resize,
            max_pixels=settings.max_pixels, min_size=settings.min_size,
        ), None
    except BadImage as exc:
        return None, str(exc)


# Starting spawned workers (fresh interpreters importing numpy, Pillow, pydantic) costs ~1.8 s here, more than
# decoding all 1,307 rps photos in-process (1.0 s, bench/preprocess_naive.py): below this, one process wins.
POOL_MIN_FILES = 4000


def auto_workers(files: int) -> int:
    """preprocess.workers=0: one process per core for large datasets, in-process for small ones."""
    return (os.cpu_count() or 1) if files >= POOL_MIN_FILES else 1


def decode_all(
    tar: Path, members: list[tuple[int, int]], settings: PreprocessParams, into: BinaryIO, workers: int
) -> list[str | None]:
    """Decode the `members` ((offset, bytes) in `tar`) on `workers` processes, appending each good one's
    pixels to `into` in member order.

    Returns a reason per failed member (None for a good one). The processes are sent offsets, not bytes,
    and read the tar themselves; nothing is held but the image in hand.
    """
    decode = functools.partial(_decode, settings=settings)
    reasons: list[str | None] = []
    if workers > 1:
        # spawn, not fork: MLflow and TensorFlow may already run threads in this process.
        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_open_tar, initargs=(str(tar.resolve()),))
    else:
        _open_tar(str(tar))
        pool = None
    try:
        with pool or contextlib.nullcontext():
            results = pool.imap(decode, members, chunksize=16) if pool else map(decode, members)
            for pixels, reason in tqdm(results, total=len(members), desc="decode", unit="img", mininterval=2):
                if pixels is not None:
                    into.write(pixels.tobytes())
                reasons.append(reason)
    finally:
        if pool is None:
            _close_tar()
    return reasons


def conflicting_copies(members: list[Member], reasons: list[str | None]) -> dict[int, str]:
    """Good files whose bytes are also a good file of another class -> the quarantine reason: which label
    is right cannot be told, and keeping both would teach the model both."""
    where: dict[str, list[int]] = {}
    for index, (member, reason) in enumerate(zip(members, reasons)):
        if reason is None:
            where.setdefault(member.sha256, []).append(index)
    conflicts = {}
    for copies in where.values():
        if len({members[i].label for i in copies}) > 1:
            for i in copies:
                others = ", ".join(members[j].path for j in copies if j != i)
                conflicts[i] = f"conflicting labels: the same bytes are {others}"
    return conflicts


def write_split(
    decoded: BinaryIO, rows: np.ndarray, labels: np.ndarray, writer: imageset.SplitWriter, chunk_bytes: int = 32 * 2**20
) -> None:
    """Copy decoded images `rows` (in that order) from the scratch file into a split, ~32 MB at a time."""
    image_bytes = writer.record.itemsize - imageset.ROWS.itemsize
    chunk = max(1, chunk_bytes // image_bytes)
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        pixels = np.frombuffer(
            b"".join(os.pread(decoded.fileno(), image_bytes, int(r) * image_bytes) for r in part), np.uint8
        ).reshape(len(part), *writer.shape)
        writer.write(pixels, labels[start : start + chunk], np.arange(start, start + len(part)))


def prepare(
    raw: Path, out: Path, settings: PreprocessParams, seed: int
) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Decode, check, split and write the tar `raw` (listed by its .json beside it, as download writes them)
    as an image set in `out`; return metrics and quarantine.

    Each split is written in a seeded random order, so a training stream that shuffles within a
    bounded buffer still sees every class in every batch. Files with the same bytes share a split; the
    same bytes under two classes are quarantined, every copy. `split_warnings` in the metrics lists the
    splits whose share misses its target widely (a caller logs them: they are not numbers).
    """
    members, pattern = list_members(raw)
    files = [(member.path, member.label) for member in members]
    size = settings.image_size
    workers = settings.workers or auto_workers(len(files))
    with tempfile.TemporaryFile(dir=out) as decoded:
        reasons = decode_all(raw, [(m.offset, m.size) for m in members], settings, decoded, workers)
        decoded.flush()
        good_rows = np.cumsum([reason is None for reason in reasons]) - 1  # file -> its row in `decoded`
        conflicts = conflicting_copies(members, reasons)
        reasons = [conflicts.get(i, reason) for i, reason in enumerate(reasons)]

        good = Counter(label for (_, label), reason in zip(files, reasons) if reason is None)
        dropped = {name for name in sorted({label for _, label in files}) if good[name] < settings.min_per_class}
        for name in dropped:
            log.warning("dropping class %r: %d good images < preprocess.min_per_class %d", name, good[name], settings.min_per_class)
        classes = sorted(name for name in good if name not in dropped)
        if len(classes) < 2:
            raise UserError(f"need at least 2 classes with images to classify; have {classes}")

        kept = np.array(
            [i for i, ((_, label), reason) in enumerate(zip(files, reasons)) if reason is None and label not in dropped],
            dtype=np.int64,
        )
        labels = np.array([classes.index(files[i][1]) for i in kept], dtype=np.int32)
        digests = [members[i].sha256 for i in kept]
        groups = merge_duplicates([group_of(files[i][0], pattern) for i in kept], digests)
        split_of = assign_splits(labels, groups, settings.splits.as_dict(), seed, classes)

        rng = np.random.default_rng(seed)
        per_split: dict[str, dict[str, int]] = {}
        placed: dict[int, tuple[str, int]] = {}  # file -> (split, row)
        for index, name in enumerate(SPLITS):
            chosen = np.flatnonzero(split_of == index)
            chosen = chosen[rng.permutation(len(chosen))]
            with imageset.SplitWriter(out, name, (size, size, 3), np.uint8) as writer:
                write_split(decoded, good_rows[kept[chosen]], labels[chosen], writer)
            placed |= {int(kept[k]): (name, row) for row, k in enumerate(chosen)}
            per_split[name] = {
                "images": len(chosen),
                "groups": len({groups[k] for k in chosen}),
                "share": round(len(chosen) / len(kept), 4),
            }

    entries = []
    group_by_file = dict(zip(kept.tolist(), groups))
    for i, ((path, label), reason) in enumerate(zip(files, reasons)):
        entry: dict[str, Any] = {"path": path, "class": label}
        if reason is not None:
            entry["quarantine"] = reason
        elif label in dropped:
            entry["dropped"] = f"class has {good[label]} good images < preprocess.min_per_class"
        else:
            entry |= {"split": placed[i][0], "row": placed[i][1], "group": group_by_file[i]}
        entries.append(entry)
    quarantined = [{"path": e["path"], "reason": e["quarantine"]} for e in entries if "quarantine" in e]
    imageset.write_meta(out, classes, {"image_size": size, "resize": settings.resize, "files": entries})
    return {
        "images_in": len(files),
        "images_out": len(kept),
        "duplicates": len(digests) - len(set(digests)),
        "quarantined": len(quarantined),
        "dropped_images": sum(1 for e in entries if "dropped" in e),
        "dropped_classes": len(dropped),
        "classes": len(classes),
        "split": per_split,
        "split_warnings": share_warnings(
            {name: split["images"] for name, split in per_split.items()}, settings.splits.as_dict()
        ),
    }, quarantined


@cli.stage("preprocess", trains=False)
def main(params: Params, run: StageRun) -> None:
    with fsio.atomic_dir(paths.PREPARED) as out:
        metrics, quarantined = prepare(paths.RAW, out, params.preprocess, params.seed)
    split_warnings = metrics.pop("split_warnings")
    for warning in split_warnings:
        log.warning("SPLIT FAR FROM ITS TARGET: %s", warning)
    if split_warnings:
        run.set_tags({"split.warning": " | ".join(split_warnings)})
    metrics["split_warnings"] = len(split_warnings)
    reasons = Counter(q["reason"].split(":", 1)[0] for q in quarantined)
    fsio.write_json(paths.QUARANTINE, {"count": len(quarantined), "by_kind": reasons, "files": quarantined})
    run.images = metrics["images_in"]
    run.record(metrics)
    run.log_artifact(paths.QUARANTINE)
    for entry in quarantined:
        log.warning("quarantined %s: %s", entry["path"], entry["reason"])
    log.info(
        "%d images -> %s; %d quarantined",
        metrics["images_in"],
        ", ".join(f"{k} {v['images']} ({v['groups']} groups)" for k, v in metrics["split"].items()),
        metrics["quarantined"],
    )


if __name__ == "__main__":
    main()
