"""preprocess stage: data/raw -> data/prepared (validated, RGB, resized, split train/val/test).

Every file ends in exactly one place: a split, the quarantine list (with its reason) or a dropped
class (with a warning). The split is stratified by class and group-aware: all frames of one shot
(`preprocess.group_pattern`) land in the same split, so near-duplicates cannot leak into the test set.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline import cli, device, fsio, imageset, paths, tracking
from pipeline.errors import UserError
from pipeline.images import BadImage, load_array
from pipeline.params import SPLITS, PreprocessParams, load_params

log = logging.getLogger("preprocess")


def list_files(raw: Path) -> list[tuple[str, str]]:
    """(path relative to raw, class) for every file in every class folder, in a stable order."""
    found = []
    for folder in sorted(p for p in raw.iterdir() if p.is_dir()):
        found += [(f.relative_to(raw).as_posix(), folder.name) for f in sorted(folder.rglob("*")) if f.is_file()]
    if not found:
        raise UserError(f"{raw} holds no files in class folders: run the download stage first")
    return found


def group_of(path: str, pattern: re.Pattern[str] | None) -> str:
    """The shot a file belongs to; a file the pattern does not match is a shot of its own."""
    name = path.rsplit("/", 1)[-1]
    match = pattern.match(name) if pattern else None
    return path if match is None else f"{path.rsplit('/', 1)[0]}/{match.group(1)}"


def assign_splits(
    labels: np.ndarray, groups: list[str], fractions: dict[str, float], seed: int, classes: list[str]
) -> np.ndarray:
    """Split index (into SPLITS) per item: per class, whole groups go to the split furthest below its share."""
    rng = np.random.default_rng(seed)
    wanted = [name for name in SPLITS if fractions[name] > 0]
    assigned = np.full(len(labels), -1, dtype=np.int8)
    for label, name in enumerate(classes):
        members: dict[str, list[int]] = {}
        for index in np.flatnonzero(labels == label):
            members.setdefault(groups[index], []).append(index)
        keys = sorted(members)
        keys = [keys[i] for i in rng.permutation(len(keys))]
        total = sum(len(v) for v in members.values())
        if len(keys) < len(wanted):
            raise UserError(
                f"class {name!r} has {total} images in {len(keys)} group(s) (shots), but the split into "
                f"{'/'.join(wanted)} needs at least {len(wanted)} groups: add images, drop the class with "
                f"preprocess.min_per_class={total + 1}, or set a fraction in preprocess.splits to 0"
            )
        filled = dict.fromkeys(wanted, 0)
        # One group for each split first (smallest share first), so no split lacks the class.
        seeding = sorted(wanted, key=lambda s: fractions[s])
        for position, key in enumerate(keys):
            split = seeding[position] if position < len(seeding) else max(
                wanted, key=lambda s: fractions[s] * total - filled[s]
            )
            filled[split] += len(members[key])
            assigned[members[key]] = SPLITS.index(split)
    return assigned


def _decode(path: Path, settings: PreprocessParams) -> tuple[np.ndarray | None, str | None]:
    try:
        return load_array(
            path, size=settings.image_size, resize=settings.resize,
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
    files: list[Path], settings: PreprocessParams, into: np.ndarray, workers: int
) -> list[str | None]:
    """Decode `files` into the rows of `into` on `workers` processes; return a reason per failed file."""
    decode = functools.partial(_decode, settings=settings)
    reasons: list[str | None] = []
    # spawn, not fork: MLflow and TensorFlow may already run threads in this process.
    with multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        results = pool.imap(decode, files, chunksize=16) if pool else map(decode, files)
        for row, (pixels, reason) in enumerate(tqdm(results, total=len(files), desc="decode", unit="img")):
            if pixels is not None:
                into[row] = pixels
            reasons.append(reason)
    return reasons


def prepare(
    raw: Path, out: Path, settings: PreprocessParams, seed: int
) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Decode, check, split and write `raw` as an image set in `out`; return metrics and quarantine."""
    files = list_files(raw)
    size = settings.image_size
    everything = np.lib.format.open_memmap(out / "_decoded.npy", mode="w+", dtype=np.uint8, shape=(len(files), size, size, 3))
    workers = settings.workers or auto_workers(len(files))
    reasons = decode_all([raw / p for p, _ in files], settings, everything, workers)

    good = Counter(label for (_, label), reason in zip(files, reasons) if reason is None)
    dropped = {name for name in sorted({label for _, label in files}) if good[name] < settings.min_per_class}
    for name in dropped:
        log.warning("dropping class %r: %d good images < preprocess.min_per_class %d", name, good[name], settings.min_per_class)
    classes = sorted(name for name in good if name not in dropped)
    if len(classes) < 2:
        raise UserError(f"need at least 2 classes with images to classify; have {classes}")

    kept = [i for i, ((_, label), reason) in enumerate(zip(files, reasons)) if reason is None and label not in dropped]
    labels = np.array([classes.index(files[i][1]) for i in kept], dtype=np.int32)
    pattern = re.compile(settings.group_pattern) if settings.group_pattern else None
    groups = [group_of(files[i][0], pattern) for i in kept]
    split_of = assign_splits(labels, groups, settings.splits.as_dict(), seed, classes)

    per_split: dict[str, dict[str, int]] = {}
    kept_array = np.array(kept, dtype=np.int64)
    for index, name in enumerate(SPLITS):
        chosen = split_of == index
        imageset.save_rows(out / f"{name}_images.npy", everything, kept_array[chosen])
        np.save(out / f"{name}_labels.npy", labels[chosen])
        per_split[name] = {
            "images": int(chosen.sum()),
            "groups": len({g for g, c in zip(groups, chosen) if c}),
        }
    del everything
    (out / "_decoded.npy").unlink()

    entries = []
    split_by_file = {kept[k]: SPLITS[s] for k, s in enumerate(split_of)}
    group_by_file = dict(zip(kept, groups))
    for i, ((path, label), reason) in enumerate(zip(files, reasons)):
        entry: dict[str, Any] = {"path": path, "class": label}
        if reason is not None:
            entry["quarantine"] = reason
        elif label in dropped:
            entry["dropped"] = f"class has {good[label]} good images < preprocess.min_per_class"
        else:
            entry |= {"split": split_by_file[i], "group": group_by_file[i]}
        entries.append(entry)
    quarantined = [{"path": e["path"], "reason": e["quarantine"]} for e in entries if "quarantine" in e]
    imageset.write_meta(out, classes, {"image_size": size, "resize": settings.resize, "files": entries})
    return {
        "images_in": len(files),
        "images_out": len(kept),
        "quarantined": len(quarantined),
        "dropped_images": sum(1 for e in entries if "dropped" in e),
        "dropped_classes": len(dropped),
        "classes": len(classes),
        "split": per_split,
    }, quarantined


def main() -> None:
    params = load_params()
    with tracking.stage_run("preprocess", params, device.cpu_only()) as run:
        with fsio.atomic_dir(paths.PREPARED) as out:
            metrics, quarantined = prepare(paths.RAW, out, params.preprocess, params.seed)
        reasons = Counter(q["reason"].split(":", 1)[0] for q in quarantined)
        fsio.write_json(paths.QUARANTINE, {"count": len(quarantined), "by_kind": reasons, "files": quarantined})
        run.images = metrics["images_in"]
        run.log_metrics(metrics)
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
    cli.run(main)
