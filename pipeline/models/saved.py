"""Saved models on disk: `<name>.keras` or `<name>.skops`, each with `<name>.json` beside it.

The JSON says what the model needs to be used outside the pipeline: its class names and how
preprocess shaped the images it was trained on (size and resize mode), so predict can do the same.
Both files may come from elsewhere: the JSON is validated and checked against the model before use.
"""
from __future__ import annotations

import reprlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline import fsio
from pipeline.errors import UserError
from pipeline.imageset import Split
from pipeline.models import classic
from pipeline.params import BaselinesParams, Params, PreprocessParams, ResizeMode

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
            if len(images) <= batch_size:  # predict() builds an input pipeline per call: 4x slower for one image
                return np.asarray(self.model.predict_on_batch(images), dtype=np.float64)
            return np.asarray(self.model.predict(images, batch_size=batch_size, verbose=0), dtype=np.float64)
        return self.model.predict_proba(classic.pixels(images, self.meta["pixels_size"]))

    def predict_split(self, split: Split, batch_size: int = 32) -> np.ndarray:
        """Class probabilities for every image of a split on disk, in record order, streamed."""
        if self.is_keras:
            from pipeline import training

            return training.predict(self.model, split, batch_size)
        return self.model.predict_proba(classic.split_pixels(split, self.meta["pixels_size"]))


def _bounds_of(section: type[BaseModel], key: str) -> list[Any]:
    """A params.yaml key's bounds, so a model's .json is held to what params allow."""
    return section.model_fields[key].metadata


class ModelMeta(BaseModel):
    """What a model's .json must hold; other keys (hyperparameters, kept_epoch, ...) pass through as they are."""

    model_config = ConfigDict(extra="allow", strict=True)

    name: str = Field(min_length=1)
    stage: str | None = None
    dataset: str | None = None
    file: str | None = None
    classes: list[Annotated[str, Field(min_length=1)]] = Field(min_length=2)
    # image_size bounds the memory predict allocates per image: 100000 would ask for 30 GB.
    image_size: Annotated[(int, *_bounds_of(PreprocessParams, "image_size"))]
    resize: ResizeMode
    # The quarantine limits preprocess applied to the training images, so predict and serving refuse the
    # same files for the same reasons (absent in older files: predict's defaults).
    min_size: Annotated[(int, *_bounds_of(PreprocessParams, "min_size"))] | None = None
    max_pixels: Annotated[(int, *_bounds_of(PreprocessParams, "max_pixels"))] | None = None

    @field_validator("classes")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"names a class twice (got {reprlib.repr(value)})")
        return value


class ClassicMeta(ModelMeta):
    """A scikit-learn model also says the side of the downscaled image it takes."""

    pixels_size: Annotated[(int, *_bounds_of(BaselinesParams, "pixels_size"))]


def _describe(error: Mapping[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "missing":
        message = "required key is missing"
    elif error["type"] in ("json_invalid", "value_error"):  # no input to show / our message shows it
        message = error["msg"].removeprefix("Value error, ")
    else:
        message = f"{error['msg']} (got {reprlib.repr(error['input'])})"
    return f"{key}: {message}" if key else message


def read_meta(path: Path) -> dict[str, Any]:
    """The validated .json beside a model file, as a dict; UserError naming the file and the key otherwise."""
    schema = ClassicMeta if path.suffix == ".skops" else ModelMeta
    source = meta_path(path)
    try:
        meta = schema.model_validate_json(source.read_bytes())
    except OSError as exc:
        raise UserError(f"{source}: cannot read ({exc.strerror or exc})") from None
    except ValidationError as exc:
        raise UserError(f"{source}: " + "; ".join(_describe(e) for e in exc.errors(include_url=False))) from None
    return meta.model_dump(exclude_unset=True)


def _mismatch(meta: Mapping[str, Any], model: Any) -> str | None:
    """Why `meta` does not describe `model` (None when it does, or when the model does not say): other class
    names would index past its outputs or mislabel them, another pixels_size would feed it other features."""
    predicted = len(model.classes_) if hasattr(model, "classes_") else getattr(model, "output_shape", (None,))[-1]
    if predicted is not None and predicted != len(meta["classes"]):
        return f"classes: names {len(meta['classes'])} classes, the model predicts {predicted}"
    features = getattr(model, "n_features_in_", None)  # scikit-learn: the RGB values of a pixels_size square
    if features is not None and features != 3 * meta["pixels_size"] ** 2:
        return f"pixels_size: {meta['pixels_size']} does not make the {features} features the model takes"
    return None


def model_meta(name: str, stage: str, params: Params, classes: Sequence[str], **extra: Any) -> dict[str, Any]:
    """What is written beside a model: enough to use it outside the pipeline."""
    return {
        "name": name,
        "stage": stage,
        "classes": list(classes),
        "dataset": params.data.dataset,
        "image_size": params.preprocess.image_size,
        "resize": params.preprocess.resize,
        "min_size": params.preprocess.min_size,
        "max_pixels": params.preprocess.max_pixels,
        **extra,
    }


def meta_path(model_path: Path) -> Path:
    return model_path.with_suffix(".json")


def save_keras(model: Any, directory: Path, meta: Mapping[str, Any]) -> Path:
    path = directory / f"{meta['name']}.keras"
    with fsio.atomic_file(path) as tmp:
        suffixed = tmp.with_name(tmp.name + ".keras")  # Keras insists on the suffix; .tmp stays in the name (swept if killed)
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
    with fsio.atomic_file(path.with_suffix(".onnx")) as tmp:
        classic.export_onnx(estimator, tmp)
    fsio.write_json(meta_path(path), {**meta, "file": path.name})
    return path


def load(path: Path) -> SavedModel:
    path = Path(path)
    if path.suffix not in SUFFIXES or not path.is_file():
        raise UserError(f"{path}: not a saved model (expected an existing .keras or .skops file)")
    if not meta_path(path).is_file():
        raise UserError(f"{meta_path(path)} is missing: it holds the class names the model predicts")
    meta = read_meta(path)
    model = classic.load_for_inference(path) if path.suffix == ".skops" else _load_keras(path)
    mismatch = _mismatch(meta, model)
    if mismatch:
        raise UserError(f"{meta_path(path)} does not fit {path.name}: {mismatch}")
    return SavedModel(path, meta, model)


def _load_keras(path: Path) -> Any:
    import keras

    import pipeline.models.layers  # noqa: F401 - registers the custom layers saved models hold

    try:
        return keras.saving.load_model(path, safe_mode=True)
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file: say which one
        raise UserError(f"{path}: cannot load the Keras model ({type(exc).__name__}: {exc})") from None


def find(directories: Iterable[Path]) -> list[Path]:
    """Every saved model in `directories`, in a stable order."""
    return sorted(p for d in directories for p in Path(d).glob("*") if p.suffix in SUFFIXES)
