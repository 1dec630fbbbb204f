"""Classify image files with an exported model: one JSON line per image.

    python -m pipeline.predict --model data/models/champion.keras IMAGE_OR_DIR...

Each image is decoded and resized exactly as preprocess did for the model's training data (its
.json says how). A file that cannot be read (or is not a regular file: a FIFO, a device) gets a line
with its `error`; the others are still predicted. The exit status is 1 when any file failed or a
directory held nothing to read, 2 when the model itself cannot be used.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline import cli
from pipeline.images import BadImage, load_array

MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # Pillow's decompression-bomb limit, preprocess's default too


def expand(target: str) -> list[Path]:
    """A path as given (a missing one is passed on to fail); a directory's entries, walked recursively in
    name order: all but directories, so a FIFO or a device in there gets its error line rather than a skip."""
    path = Path(target)
    if not path.is_dir():
        return [path]
    return sorted(p for p in path.rglob("*") if not p.is_dir())


def top_k(probabilities: np.ndarray, classes: Sequence[str], k: int) -> list[dict[str, Any]]:
    order = np.argsort(-probabilities, kind="stable")[:k]  # ties: the first class, as argmax does
    return [{"label": classes[i], "probability": round(float(probabilities[i]), 6)} for i in order]


def predict_files(model: Any, files: Iterable[Path], k: int, batch_size: int = 32) -> Iterator[dict[str, Any]]:
    """Result lines in input order; bad files yield an error line and do not stop the others."""
    size, resize = model.meta["image_size"], model.meta["resize"]
    pending: list[tuple[Path, np.ndarray | None, str | None]] = []

    def flush() -> Iterator[dict[str, Any]]:
        good = [array for _, array, _ in pending if array is not None]
        probabilities = iter(model.predict_proba(np.stack(good)) if good else [])
        for path, array, error in pending:
            if error is not None:
                yield {"path": str(path), "error": error}
                continue
            ranked = top_k(next(probabilities), model.classes, k)
            yield {"path": str(path), "label": ranked[0]["label"], "probability": ranked[0]["probability"], "top_k": ranked}
        pending.clear()

    for path in files:
        try:
            pending.append((path, load_array(path, size=size, resize=resize, max_pixels=MAX_PIXELS), None))
        except BadImage as exc:
            pending.append((path, None, str(exc)))
        except OSError as exc:  # a missing file (load_rgb reports the others as bad images)
            pending.append((path, None, f"cannot read: {exc.strerror or exc}"))
        if len(pending) == batch_size:
            yield from flush()
    yield from flush()


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
    listings = [(target, expand(target)) for target in args.images]
    failed = 0
    for target, files in listings:
        if not files:  # otherwise nothing at all is printed and the run looks like a success
            print(f"error: no image files under {target}", file=sys.stderr)
            failed += 1
    for line in predict_files(model, [path for _, files in listings for path in files], args.top_k):
        failed += "error" in line
        print(json.dumps(line), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    cli.run(lambda: sys.exit(main()))
