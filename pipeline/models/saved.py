"""Saved models on disk: `<name>.keras` or `<name>.skops`, each with `<name>.json` beside it.

The JSON says what the model needs to be used outside the pipeline: its class names and how
preprocess shaped the images it was trained on (size and resize mode), so predict can do the same.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import fsio
from pipeline.errors import UserError
from pipeline.imageset import Split
from pipeline.models import classic
from pipeline.params import Params

SUFFIXES = (".keras", ".skops")


@dataclass
class SavedModel:
    path: Path
    meta: dict[str, Any]
    model: Any

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    @property
    def is_keras(self) -> bool:
        return self.path.suffix == ".keras"

    def predict_proba(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """uint8 (N, H, W, 3) -> class probabilities (N, classes)."""
        if self.is_keras:
            return np.asarray(self.model.predict(images, batch_size=batch_size, verbose=0), dtype=np.float64)
        return self.model.predict_proba(classic.pixels(images, self.meta["pixels_size"]))

    def predict_split(self, split: Split, batch_size: int = 32) -> np.ndarray:
        """Class probabilities for every image of a split on disk, in record order, streamed."""
        if self.is_keras:
            from pipeline import training

            return training.predict(self.model, split, batch_size)
        return self.model.predict_proba(classic.split_pixels(split, self.meta["pixels_size"]))


def model_meta(name: str, stage: str, params: Params, classes: Sequence[str], **extra: Any) -> dict[str, Any]:
    """What is written beside a model: enough to use it outside the pipeline."""
    return {
        "name": name,
        "stage": stage,
        "classes": list(classes),
        "dataset": params.data.dataset,
        "image_size": params.preprocess.image_size,
        "resize": params.preprocess.resize,
        **extra,
    }


def meta_path(model_path: Path) -> Path:
    return model_path.with_suffix(".json")


def save_keras(model: Any, directory: Path, meta: Mapping[str, Any]) -> Path:
    path = directory / f"{meta['name']}.keras"
    with fsio.atomic_file(path) as tmp:
        suffixed = tmp.with_suffix(".keras")  # Keras insists on the suffix
        try:
            model.save(suffixed)
            suffixed.replace(tmp)
        finally:
            suffixed.unlink(missing_ok=True)
    fsio.write_json(meta_path(path), {**meta, "file": path.name})
    return path


def save_classic(estimator: Any, directory: Path, meta: Mapping[str, Any]) -> Path:
    path = directory / f"{meta['name']}.skops"
    with fsio.atomic_file(path) as tmp:
        classic.save(estimator, tmp)
    fsio.write_json(meta_path(path), {**meta, "file": path.name})
    return path


def load(path: Path) -> SavedModel:
    path = Path(path)
    if path.suffix not in SUFFIXES or not path.is_file():
        raise UserError(f"{path}: not a saved model (expected an existing .keras or .skops file)")
    if not meta_path(path).is_file():
        raise UserError(f"{meta_path(path)} is missing: it holds the class names the model predicts")
    meta = fsio.read_json(meta_path(path))
    if path.suffix == ".skops":
        return SavedModel(path, meta, classic.load(path))
    import keras

    import pipeline.models.layers  # noqa: F401 - registers the custom layers saved models hold

    try:
        model = keras.saving.load_model(path, safe_mode=True)
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file: say which one
        raise UserError(f"{path}: cannot load the Keras model ({type(exc).__name__}: {exc})") from None
    return SavedModel(path, meta, model)


def find(directories: Iterable[Path]) -> list[Path]:
    """Every saved model in `directories`, in a stable order."""
    return sorted(p for d in directories for p in Path(d).glob("*") if p.suffix in SUFFIXES)
