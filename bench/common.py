"""What the benchmarks share: result files, timing, the child-process environment, an rps sample."""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import fsio
from pipeline.device import host_tags
from pipeline.imageset import Split
from pipeline.params import SPLITS, Params, PreprocessParams, load_params

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SHARED = ROOT.parent / "shared"
RPS = SHARED / "datasets" / "rps"
XCEPTION_WEIGHTS = SHARED / "weights" / "xception_imagenet_notop.weights.h5"
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


def venv_env() -> dict[str, str]:
    """For child processes: this venv's bin first on PATH (dvc, python), and MLflow's default store.

    Not resolved: the venv's python is a symlink whose location is what makes it the venv's.
    """
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def write_result(name: str, result: Mapping[str, Any]) -> Path:
    """bench/results/<name>.json (atomic), with the host and a UTC timestamp; echoed to stdout."""
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


def rps_sample(
    data: Path, settings: PreprocessParams, counts: Mapping[str, int], seed: int
) -> tuple[list[str], dict[str, Split]]:
    """Class-stratified samples of `counts[split]` images, decoded as preprocess decodes them.

    Split by shot first (preprocess's own assign_splits): burst frames of one shot in both train and
    val would make val accuracy meaningless. Only the sampled files are decoded.
    """
    # Here, not at the top: tracking_overhead's child imports this module and times `import mlflow`
    # as a stage sees it, without scikit-learn/scipy already loaded.
    from sklearn.model_selection import train_test_split

    from pipeline.images import load_array
    from pipeline.stages.preprocess import assign_splits, group_of, list_files

    files = list_files(data)
    classes = sorted({label for _, label in files})
    labels = np.array([classes.index(label) for _, label in files])
    pattern = re.compile(settings.group_pattern) if settings.group_pattern else None
    groups = [group_of(path, pattern) for path, _ in files]
    total = sum(counts.values())
    split_of = assign_splits(labels, groups, {s: counts.get(s, 0) / total for s in SPLITS}, seed, classes)
    sample: dict[str, Split] = {}
    for name, count in counts.items():
        pool = np.flatnonzero(split_of == SPLITS.index(name))
        if count < len(pool):
            pool = np.sort(train_test_split(pool, train_size=count, stratify=labels[pool], random_state=seed)[0])
        images = np.stack([
            load_array(data / files[i][0], size=settings.image_size, resize=settings.resize,
                       max_pixels=settings.max_pixels, min_size=settings.min_size)
            for i in pool
        ])
        sample[name] = Split(images, labels[pool].astype(np.int32))
    return classes, sample
