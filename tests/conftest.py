"""Shared fixtures: small generated photo folders, and the real ../shared data when present."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import imageset
from pipeline.params import Params, load_params

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DOWNLOAD_LIMITS = load_params(REPO / "params.yaml").download


def write_image(path: Path, size: tuple[int, int] = (64, 48), seed: int = 0, mode: str = "RGB", fmt: str | None = None) -> Path:
    """A random-noise image with a coloured block, so resizing and rotation are visible in tests."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    pixels[: size[1] // 2, : size[0] // 2] = (255, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path, format=fmt)
    return path


def make_dataset(root: Path, classes: int = 3, shots: int = 4, frames: int = 2, size=(64, 48)) -> Path:
    """Class-per-folder JPEGs named like rps bursts: <shot>.jpg, <shot>_1.jpg, ..."""
    for c in range(classes):
        for s in range(shots):
            for f in range(frames):
                name = f"shot{s}.jpg" if f == 0 else f"shot{s}_{f}.jpg"
                write_image(root / f"class{c}" / name, size=size, seed=c * 1000 + s * 10 + f)
    return root


def split_on_disk(directory: Path, x: np.ndarray, labels, name: str = "split") -> imageset.Split:
    """Examples (images or features) written as an on-disk split, as the stages exchange them."""
    directory.mkdir(parents=True, exist_ok=True)
    with imageset.SplitWriter(directory, name, x.shape[1:], x.dtype) as writer:
        writer.write(x, np.asarray(labels, dtype=np.int32), np.arange(len(x)))
    return imageset.load_split(directory, name)


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A scratch project directory as the working directory: dvc.yaml (the stages' params lists) and the
    default sqlite MLflow store under it."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    return tmp_path


@pytest.fixture
def params() -> Params:
    return load_params(REPO / "params.yaml")


@pytest.fixture
def shared_rps() -> Path:
    rps = SHARED / "datasets" / "rps"
    if not rps.is_dir():
        pytest.skip("../shared/datasets/rps is not present")
    return rps
