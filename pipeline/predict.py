"""Classify image files with an exported model: one JSON line per image.

    python -m pipeline.predict --model data/models/champion.keras IMAGE_OR_DIR...

Each image is decoded and resized exactly as preprocess did for the model's training data (its
.json says how). A file that cannot be read (or is not a regular file: a FIFO, a device) gets a line
with its `error`; the others are still predicted. The exit status is 1 when any file failed or a
directory held nothing to read, 2 when the model itself cannot be used. Files are read a batch at a
time and directories walked lazily, so a directory of any size is streamed. TensorFlow is imported for
Keras models only (its import alone takes seconds).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import cli
from pipeline.images import BadImage, ImageSource, load_array

MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb limit (lifted by images.py), preprocess's default too


def walk(directory: Path) -> Iterator[Path]:
    """A directory's entries, recursively, names sorted within each directory, one at a time: all but
    directories, so a FIFO or a device in there gets its error line rather than a skip. A link to a
    directory is not followed (no loops): it gets its error line too."""
    with os.scandir(directory) as listing:
        entries = sorted(listing, key=lambda e: e.name)
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from walk(Path(entry.path))
        else:
            yield Path(entry.path)


def expand(targets: Iterable[str], empty: list[str]) -> Iterator[Path]:
    """Every file the targets name, in order: a path as given (a missing one is passed on to fail), a
    directory walked. A directory that yields nothing is appended to `empty`."""
    for target in targets:
        path = Path(target)
        if not path.is_dir():
            yield path
            continue
        found = False
        for found, file in enumerate(walk(path), start=1):
            yield file
        if not found:
            empty.append(target)


def top_k(probabilities: np.ndarray, classes: Sequence[str], k: int) -> list[dict[str, Any]]:
    order = np.argsort(-probabilities, kind="stable")[:k]  # ties: the first class, as argmax does
    return [{"label": classes[i], "probability": round(float(probabilities[i]), 6)} for i in order]


def decode(model: Any, source: ImageSource) -> np.ndarray:
    """`source` as the model's input, decoded and checked as preprocess did for its training data: the same
    quarantine reasons (BadImage), with the limits the model's .json records (predict's defaults otherwise)."""
    meta = model.meta
    return load_array(
        source, size=meta["image_size"], resize=meta["resize"],
        max_pixels=meta.get("max_pixels") or MAX_PIXELS, min_size=meta.get("min_size") or 1,
    )


def predict_sources(
    model: Any, sources: Iterable[tuple[Any, ImageSource | BadImage]], k: int, batch_size: int = 32
) -> Iterator[tuple[Any, dict[str, Any]]]:
    """(key, result) for each (key, source), in input order: `label`, `probability` and `top_k`, or the
    `error` of a source that cannot be used (a BadImage given instead of a source is reported as it is).
    Decoded and predicted a batch at a time."""
    pending: list[tuple[Any, np.ndarray | str]] = []

    def flush() -> Iterator[tuple[Any, dict[str, Any]]]:
        good = [item for _, item in pending if not isinstance(item, str)]
        probabilities = iter(model.predict_proba(np.stack(good)) if good else [])
        for key, item in pending:
            if isinstance(item, str):
                yield key, {"error": item}
                continue
            ranked = top_k(next(probabilities), model.classes, k)
            yield key, {"label": ranked[0]["label"], "probability": ranked[0]["probability"], "top_k": ranked}
        pending.clear()

    for key, source in sources:
        try:
            if isinstance(source, BadImage):
                raise source
            pending.append((key, decode(model, source)))
        except BadImage as exc:
            pending.append((key, str(exc)))
        except OSError as exc:  # a missing file (load_rgb reports the others as bad images)
            pending.append((key, f"cannot read: {exc.strerror or exc}"))
        if len(pending) == batch_size:
            yield from flush()
    yield from flush()


def predict_files(model: Any, files: Iterable[Path], k: int, batch_size: int = 32) -> Iterator[dict[str, Any]]:
    """Result lines in input order, each with its `path`; bad files yield an error line and do not stop the others."""
    for path, result in predict_sources(model, ((path, path) for path in files), k, batch_size):
        yield {"path": str(path), **result}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="a .keras (or .skops) model with its .json beside it")
    parser.add_argument("--top-k", type=int, default=3, help="how many labels to list per image (default 3)")
    parser.add_argument("images", nargs="+", help="image files or directories")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error("--top-k must be at least 1")

    from pipeline.models import saved

    model = saved.load(args.model)
    empty: list[str] = []
    failed = 0
    for line in predict_files(model, expand(args.images, empty), args.top_k):
        failed += "error" in line
        print(json.dumps(line), flush=True)
    for target in empty:  # otherwise nothing at all is printed for it and the run looks like a success
        print(f"error: no image files under {target}", file=sys.stderr)
    return 1 if failed or empty else 0


if __name__ == "__main__":
    cli.run(lambda: sys.exit(main()))
