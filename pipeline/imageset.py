"""The on-disk image set passed between stages: few large files, because DVC is slow on many small ones.

    <dir>/classes.json              ["paper", "rock", ...]; a label is an index into it
    <dir>/<split>_images.npy        uint8 (N, H, W, 3), memory-mappable
    <dir>/<split>_labels.npy        int32 (N,)
    <dir>/manifest.json             where every source file went (a split, or quarantine)
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import fsio
from pipeline.errors import UserError


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 (N, H, W, 3)
    labels: np.ndarray  # int32 (N,)

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (N, H, W, 3); got {self.images.dtype} {self.images.shape}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")


def save_rows(path: Path, source: np.ndarray, index: np.ndarray, chunk: int = 512) -> None:
    """np.save(path, source[index]) without holding the gathered copy in memory."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=source.dtype, shape=(len(index), *source.shape[1:]))
    for start in range(0, len(index), chunk):
        out[start : start + chunk] = source[index[start : start + chunk]]
    out.flush()
    del out


def write_split(directory: Path, name: str, split: Split) -> None:
    np.save(directory / f"{name}_images.npy", split.images)
    np.save(directory / f"{name}_labels.npy", split.labels.astype(np.int32))


def write_meta(directory: Path, classes: Sequence[str], manifest: Mapping[str, Any]) -> None:
    fsio.write_json(directory / "classes.json", list(classes))
    fsio.write_json(directory / "manifest.json", manifest)


def load_split(directory: Path, name: str, mmap: bool = True) -> Split:
    images_path = Path(directory) / f"{name}_images.npy"
    if not images_path.exists():
        raise UserError(f"{images_path} is missing: run the stage that writes {directory} first (dvc repro)")
    return Split(
        np.load(images_path, mmap_mode="r" if mmap else None),
        np.load(Path(directory) / f"{name}_labels.npy"),
    )


def load_classes(directory: Path) -> list[str]:
    return fsio.read_json(Path(directory) / "classes.json")


def load_manifest(directory: Path) -> dict[str, Any]:
    return fsio.read_json(Path(directory) / "manifest.json")
