"""What every training stage shares: the train set, Keras fit with the seeds' callbacks, scores, curves.

Each fit logs its epochs to the active MLflow run (the model's nested run) and returns the rows
that become the DVC learning-curve plot.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import keras
import numpy as np

from pipeline import fsio, imageset, paths
from pipeline.errors import UserError
from pipeline.imageset import Split
from pipeline.params import Params, TrainParams
from pipeline.tracking import StageRun


@dataclass(frozen=True)
class Examples:
    """Inputs of any shape (cached features, say) and their labels: what `fit` trains on."""

    images: np.ndarray
    labels: np.ndarray


Joined = TypeVar("Joined", Split, Examples)


def joined(first: Joined, second: Joined) -> Joined:
    """Two sets of examples as one: a train split and its augmented copies."""
    return type(first)(np.concatenate([first.images, second.images]), np.concatenate([first.labels, second.labels]))


def training_set(params: Params) -> Split:
    """The prepared train split, plus the augment stage's copies when train.use_augmented."""
    train = imageset.load_split(paths.PREPARED, "train", mmap=False)
    if not params.train.use_augmented:
        return train
    return joined(train, imageset.load_split(paths.AUGMENTED, "train", mmap=False))


def validation_set() -> Split:
    val = imageset.load_split(paths.PREPARED, "val", mmap=False)
    if len(val.labels) == 0:
        raise UserError("the val split is empty: model stages need one (raise preprocess.splits.val)")
    return val


def seeded_data(params: Params) -> tuple[list[str], Split, Split]:
    """What a training stage starts from: the global seed set, the class names, train and val."""
    keras.utils.set_random_seed(params.seed)
    return imageset.load_classes(paths.PREPARED), training_set(params), validation_set()


def compile_classifier(model: keras.Model, learning_rate: float, settings: TrainParams) -> keras.Model:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=settings.xla,
    )
    return model


def seed_callbacks(settings: TrainParams) -> list[keras.callbacks.Callback]:
    """Early stopping with best-weights restore and ReduceLROnPlateau, as the seeds trained."""
    found: list[keras.callbacks.Callback] = []
    if settings.early_stopping_patience:
        found.append(keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=settings.early_stopping_patience, restore_best_weights=True
        ))
    if settings.reduce_lr_patience:
        found.append(keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", factor=settings.reduce_lr_factor, patience=settings.reduce_lr_patience
        ))
    return found


class EpochLogger(keras.callbacks.Callback):
    """Per-epoch metrics, learning rate and seconds to MLflow, kept as rows for the DVC plot."""

    def __init__(self, run: StageRun, train_images: int) -> None:
        super().__init__()
        self.run = run
        self.train_images = train_images
        self.rows: list[dict[str, float]] = []
        self._start = 0.0

    def on_epoch_begin(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        seconds = time.perf_counter() - self._start
        row = {"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}}
        row |= {"seconds": round(seconds, 3), "images_per_second": round(self.train_images / seconds, 2)}
        self.rows.append(row)
        # Prefixed: the model's final scores (best weights restored) use the plain names.
        self.run.log_active({f"epoch_{k}": v for k, v in row.items() if k != "epoch"}, step=epoch + 1)


@dataclass
class FitResult:
    rows: list[dict[str, float]]
    seconds: float
    images_seen: int

    @property
    def summary(self) -> dict[str, float]:
        best = max(self.rows, key=lambda r: r.get("val_accuracy", 0.0))
        return {
            "epochs_run": len(self.rows),
            "best_epoch": best["epoch"],
            "best_val_accuracy": best.get("val_accuracy", 0.0),
            "train_seconds": round(self.seconds, 3),
            "seconds_per_epoch": round(self.seconds / len(self.rows), 3),
            "train_images_per_second": round(self.images_seen / self.seconds, 2),
        }


def fit(
    model: keras.Model,
    train: Split | Examples,
    val: Split | Examples,
    *,
    settings: TrainParams,
    epochs: int,
    run: StageRun,
    extra_callbacks: Sequence[keras.callbacks.Callback] = (),
) -> FitResult:
    logger = EpochLogger(run, len(train.labels))
    start = time.perf_counter()
    model.fit(
        train.images,
        train.labels,
        validation_data=(val.images, val.labels),
        epochs=epochs,
        batch_size=settings.batch_size,
        shuffle=True,
        callbacks=[logger, *seed_callbacks(settings), *extra_callbacks],
        verbose=2,
    )
    seconds = time.perf_counter() - start
    return FitResult(logger.rows, seconds, len(train.labels) * len(logger.rows))


def scores(labels: np.ndarray, probabilities: np.ndarray, prefix: str = "") -> dict[str, float]:
    """Accuracy and macro precision/recall/F1 over the classes present in `labels` or predicted."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    predicted = probabilities.argmax(axis=1)
    precision, recall, f1, _ = precision_recall_fscore_support(labels, predicted, average="macro", zero_division=0)
    values = {"accuracy": accuracy_score(labels, predicted), "precision": precision, "recall": recall, "f1": f1}
    return {f"{prefix}{k}": round(float(v), 4) for k, v in values.items()}


def write_curves(rows: Sequence[Mapping[str, float]], path: Path) -> None:
    """One model's learning curve, a DVC plot (x: epoch)."""
    fsio.write_json(path, list(rows))


def model_meta(name: str, stage: str, params: Params, classes: Sequence[str], **extra: Any) -> dict[str, Any]:
    """What saved.py writes beside a model: enough to use it outside the pipeline."""
    return {
        "name": name,
        "stage": stage,
        "classes": list(classes),
        "dataset": params.data.dataset,
        "image_size": params.preprocess.image_size,
        "resize": params.preprocess.resize,
        **extra,
    }
