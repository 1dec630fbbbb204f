"""What the benchmarks share: result files, timing, the child-process environment, an rps sample on disk."""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import fsio, imageset
from pipeline.device import host_tags
from pipeline.imageset import Split
from pipeline.params import SPLITS, Params, PreprocessParams, load_params

ROOT = Path(__file__).resolve().parents[1]
# BENCH_RESULTS=DIR sends a smoke run's JSON elsewhere, leaving the recorded results alone.
RESULTS = Path(os.environ.get("BENCH_RESULTS") or ROOT / "bench" / "results")
SHARED = ROOT.parent / "shared"
RPS = SHARED / "datasets" / "rps"
XCEPTION_WEIGHTS = SHARED / "weights" / "xception_imagenet_notop.weights.h5"
MAKE_SCALE_SET = SHARED / "tools" / "make_scale_set.py"
# Other work on the machine skews every number here: each result records the load before and after.
LOAD_AT_START = os.getloadavg()


def params() -> Params:
    return load_params(ROOT / "params.yaml")


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """(fn's result, wall seconds)."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def spread(seconds: list[float]) -> dict[str, Any]:
    """Every timed run, the fastest and the median. Interference (other jobs; on this VM some passes
    run at one core's speed) only ever adds time, so the ratios use the fastest."""
    return {
        "seconds": [round(s, 3) for s in seconds],
        "min_seconds": round(min(seconds), 3),
        "median_seconds": round(statistics.median(seconds), 3),
    }


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def venv_env() -> dict[str, str]:
    """For child processes: this venv's bin first on PATH (dvc, python), and MLflow's default store.

    Not resolved: the venv's python is a symlink whose location is what makes it the venv's.
    """
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def write_result(name: str, result: Mapping[str, Any]) -> Path:
    """bench/results/<name>.json (atomic), with the host and a UTC timestamp; echoed to stdout."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    record = {
        "benchmark": name,
        "utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": host_tags(),
        "load_average_1_5_15_min": {"start": LOAD_AT_START, "end": os.getloadavg()},
        **result,
    }
    fsio.write_json(path, record)
    print(json.dumps(record, indent=2))
    print(f"wrote {path}", file=sys.stderr)
    return path


def scale_photos(scratch: Path, count: int, side: int, classes: int) -> Path:
    """<scratch>/photos-<count>-<side>px-<classes>c from ../shared's make_scale_set.py, generated once
    (into a .partial folder renamed when complete, so an interrupted run starts that set over)."""
    folder = scratch / f"photos-{count}-{side}px-{classes}c"
    if folder.is_dir():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    print(f"generating {count} photos at {side} px in {folder} (~{count / 300:.0f} s)", file=sys.stderr, flush=True)
    subprocess.run(
        [sys.executable, str(MAKE_SCALE_SET), str(partial), "--images", str(count), "--side", str(side),
         "--classes", str(classes)], check=True, stdout=sys.stderr,
    )
    partial.rename(folder)
    return folder


def raw_tar(source: Path, tar: Path, group_pattern: str | None = None) -> Path:
    """A class-per-folder directory packed as the download stage packs data/raw.tar, with its listing
    (data/raw.json) beside it: what preprocess's `prepare` reads."""
    from pipeline.params import DatasetSpec
    from pipeline.stages.download import materialise

    spec = DatasetSpec(source=str(source.resolve()), group_pattern=group_pattern)
    listing = materialise(spec, tar, tar.parent / "downloads", ROOT, params().download)
    fsio.write_json(tar.with_suffix(".json"), {"group_pattern": group_pattern, **listing})
    return tar


def spread_photos(folder: Path, count: int) -> list[Path]:
    """`count` .jpg photos spread evenly over a folder's sorted files (so every class is in, for rps)."""
    files = sorted(folder.rglob("*.jpg"))
    return files[:: max(1, len(files) // count)][:count]


def class_files(data: Path) -> list[tuple[str, str]]:
    """(path relative to `data`, class) of every file in the class folders of a directory, in name order."""
    from pipeline.stages.download import walk_dataset

    return [(name, name.split("/", 1)[0]) for name, _ in walk_dataset(data)[0] if "/" in name]


def rps_sample(
    data: Path, settings: PreprocessParams, counts: Mapping[str, int], seed: int, out: Path
) -> tuple[list[str], dict[str, Split]]:
    """Class-stratified samples of `counts[split]` images, decoded as preprocess decodes them and
    written as image-set splits in `out` (a scratch directory), as the stages read them.

    Split by shot first (preprocess's own assign_splits): burst frames of one shot in both train and
    val would make val accuracy meaningless. Only the sampled files are decoded, one at a time.
    """
    # Here, not at the top: tracking_overhead's child imports this module and times `import mlflow`
    # as a stage sees it, without scikit-learn/scipy already loaded.
    from sklearn.model_selection import train_test_split

    from pipeline.images import load_array
    from pipeline.splitting import assign_splits, group_of
    files = class_files(data)
    classes = sorted({label for _, label in files})
    labels = np.array([classes.index(label) for _, label in files])
    group_pattern = params().data.datasets["rps"].group_pattern
    pattern = re.compile(group_pattern) if group_pattern else None
    groups = [group_of(path, pattern) for path, _ in files]
    total = sum(counts.values())
    split_of = assign_splits(labels, groups, {s: counts.get(s, 0) / total for s in SPLITS}, seed, classes)
    size = settings.image_size
    sample: dict[str, Split] = {}
    for name, count in counts.items():
        pool = np.flatnonzero(split_of == SPLITS.index(name))
        if count < len(pool):
            pool = np.sort(train_test_split(pool, train_size=count, stratify=labels[pool], random_state=seed)[0])
        with imageset.SplitWriter(out, name, (size, size, 3), np.uint8) as writer:
            for row, i in enumerate(pool):
                image = load_array(data / files[i][0], size=size, resize=settings.resize,
                                   max_pixels=settings.max_pixels, min_size=settings.min_size)
                writer.write(image[None], labels[i : i + 1], np.array([row]))
        sample[name] = imageset.load_split(out, name)
    return classes, sample


def in_memory(split: Split) -> tuple[np.ndarray, np.ndarray]:
    """(examples, labels) of a whole split as numpy arrays: for the arms that fit or predict in memory."""
    if split.count == 0:
        return np.empty((0, *split.shape), split.dtype), np.empty(0, np.int32)
    records = np.concatenate(list(split.batches(4096)))
    return records["x"], records["label"].astype(np.int32)


class NoTracking:
    """training.fit logs each epoch to the stage's MLflow run; here there is none (and no store to write).
    Its per-epoch call (at each epoch's end, as EpochTimer's) marks the process's CPU time."""

    def __init__(self) -> None:
        self.cpu_at_end: list[float] = [time.process_time()]

    def log_now(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.cpu_at_end.append(time.process_time())

    @property
    def cpu_seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.cpu_at_end, self.cpu_at_end[1:])]
