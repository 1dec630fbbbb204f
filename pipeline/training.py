"""Keras training as every stage does it: streamed data, the seeds' callbacks, per-epoch logging, curves.

Each fit logs its epochs to the active MLflow run (the model's nested run) and returns the rows
that become the DVC learning-curve plot, plus a summary of the weights the model ends with.

Under a tf.distribute strategy (train.strategy, set by pipeline.device) train.batch_size is each replica's
batch: the streams carry batch_size x replicas, so an epoch takes 1/replicas of the steps, and the learning
rate is multiplied by sqrt(replicas), the square-root rule for Adam (its update size does not grow with the
batch as SGD's does; the linear rule, x replicas, made 2-replica fits at 0.01 oscillate in tests/test_distributed.py).
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from pipeline import fsio, imageset, paths
from pipeline.errors import UserError
from pipeline.imageset import Split
from pipeline.params import Params, TrainParams
from pipeline.tracking import StageRun


def training_set(params: Params) -> Split:
    """The prepared train split, plus the augment stage's copies when train.use_augmented."""
    train = imageset.load_split(paths.PREPARED, "train")
    if not params.train.use_augmented:
        return train
    return imageset.joined(train, imageset.load_split(paths.AUGMENTED, "train"))


def validation_set() -> Split:
    val = imageset.load_split(paths.PREPARED, "val")
    if val.count == 0:
        raise UserError("the val split is empty: model stages need one (raise preprocess.splits.val)")
    return val


def load_train_val(params: Params) -> tuple[list[str], Split, Split]:
    """What a training stage starts from: the global seed set, the class names, train and val."""
    keras.utils.set_random_seed(params.seed)
    return imageset.load_classes(paths.PREPARED), training_set(params), validation_set()


def on_the_fly(params: Params) -> dict[str, Any]:
    """fit()'s `augmenter` and `copies` when train.augment_on_the_fly is on; nothing when it is off."""
    if not params.train.augment_on_the_fly:
        return {}
    from pipeline.models.layers import build_augmenter

    return {"augmenter": build_augmenter(params.augment, params.seed), "copies": params.train.on_the_fly_copies}


def replicas() -> int:
    """Replicas of the tf.distribute strategy in force (1 without one)."""
    import tensorflow as tf

    return int(tf.distribute.get_strategy().num_replicas_in_sync)


def global_batch(settings: TrainParams) -> int:
    return settings.batch_size * replicas()


def by_record(stream: Any) -> Any:
    """A stream a multi-worker fit shards by record (DATA): every worker reads the same seeded order and
    keeps its share. Sharding by shard file (TensorFlow's AUTO) would leave a worker without data where a
    split has fewer shard files than there are workers. No effect without a multi-worker strategy."""
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return stream.with_options(options)


def train_stream(
    train: Split, settings: TrainParams, seed: int, *, keep: np.ndarray | None = None,
    augmenter: keras.Layer | None = None, copies: int = 1,
) -> Any:
    """The shuffled training stream at the global batch."""
    return by_record(imageset.stream(
        train, global_batch(settings), shuffle_seed=seed, keep=keep, augmenter=augmenter, copies=copies
    ))


def val_stream(val: Split, settings: TrainParams) -> Any:
    return by_record(imageset.stream(val, global_batch(settings)))


def compile_classifier(model: keras.Model, learning_rate: float, settings: TrainParams) -> keras.Model:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate * replicas() ** 0.5),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=settings.xla,
    )
    return model


def plateau_callbacks(settings: TrainParams) -> list[keras.callbacks.Callback]:
    """Early stopping that restores the best-val_loss weights, and ReduceLROnPlateau, as the seeds trained."""
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
        self.run.log_now({f"epoch_{k}": v for k, v in row.items() if k != "epoch"}, step=epoch + 1)


@dataclass
class FitResult:
    rows: list[dict[str, float]]
    seconds: float
    images_seen: int
    kept_epoch: int  # 1-based: the epoch whose weights the model ends with (EarlyStopping restores one)

    @property
    def summary(self) -> dict[str, float]:
        kept = self.rows[self.kept_epoch - 1]
        return {
            "epochs_run": len(self.rows),
            "kept_epoch": self.kept_epoch,
            "kept_val_accuracy": round(kept.get("val_accuracy", 0.0), 4),
            "kept_val_loss": round(kept.get("val_loss", 0.0), 4),
            "train_seconds": round(self.seconds, 3),
            "seconds_per_epoch": round(self.seconds / len(self.rows), 3),
            "train_images_per_second": round(self.images_seen / self.seconds, 2),
        }


def kept_epoch(callbacks: Sequence[keras.callbacks.Callback], epochs_run: int) -> int:
    """The epoch whose weights a fit ends with: EarlyStopping's restored best, else the last."""
    for callback in callbacks:
        if isinstance(callback, keras.callbacks.EarlyStopping) and callback.restore_best_weights:
            if callback.best_weights is not None:
                return callback.best_epoch + 1
    return epochs_run


def fit(
    model: keras.Model,
    train: Split,
    val: Split,
    *,
    settings: TrainParams,
    epochs: int,
    run: StageRun,
    seed: int,
    augmenter: keras.Layer | None = None,
    copies: int = 1,
    keep: np.ndarray | None = None,
) -> FitResult:
    """Train on a shuffled stream of `train` (only the sources `keep` marks), validating on `val` each epoch.

    With an `augmenter`, each epoch streams every train image `copies` times, each freshly augmented.
    """
    images = copies * imageset.streamed(train, keep)
    logger = EpochLogger(run, images)
    callbacks = [logger, *plateau_callbacks(settings)]
    start = time.perf_counter()
    model.fit(
        train_stream(train, settings, seed, keep=keep, augmenter=augmenter, copies=copies),
        validation_data=val_stream(val, settings),
        epochs=epochs,
        shuffle=False,  # the stream shuffles
        callbacks=callbacks,
        verbose=2,
    )
    seconds = time.perf_counter() - start
    return FitResult(logger.rows, seconds, images * len(logger.rows), kept_epoch(callbacks, len(logger.rows)))


def predict(model: keras.Model, split: Split, batch_size: int) -> np.ndarray:
    """Class probabilities for every record of `split`, in record order, streamed."""
    return np.asarray(model.predict(by_record(imageset.stream(split, batch_size)), verbose=0), dtype=np.float64)


def write_curves(rows: Sequence[Mapping[str, float]], path: Path) -> None:
    """One model's learning curve, a DVC plot (x: epoch)."""
    fsio.write_json(path, list(rows))
