"""transfer stage: a head on the cached backbone features, optional fine-tuning -> one exported model.

Phase 1 trains the head (dropout -> dense) on data/features: many epochs cost seconds.
Phase 2 (transfer.fine_tune_epochs > 0) unfreezes the top transfer.fine_tune_layers of the base
at a low learning rate, with on-the-fly augmentation and BatchNorm in inference mode (the base is
called with training=False), as the Keras transfer-learning guide does. The export takes raw
uint8 images of any size: resizing and the backbone's preprocessing are inside.
"""
from __future__ import annotations

import logging
from typing import Any

import keras
import numpy as np

from pipeline import cli, device, fsio, imageset, paths, tracking, training
from pipeline.imageset import Split
from pipeline.models import backbones, saved
from pipeline.models.layers import build_augmenter
from pipeline.params import Params, TransferParams, load_params
from pipeline.tracking import StageRun
from pipeline.training import Examples

log = logging.getLogger("transfer")


def cached_features(params: Params) -> tuple[Examples, Examples]:
    """Train (with the augmented copies' features when train.use_augmented) and val features."""
    def load(name: str) -> Examples:
        return Examples(np.load(paths.FEATURES / f"{name}_features.npy"), np.load(paths.FEATURES / f"{name}_labels.npy"))

    train = training.joined(load("train"), load("augmented")) if params.train.use_augmented else load("train")
    return train, load("val")


def build_head(feature_size: int, num_classes: int, dropout: float) -> keras.Model:
    features = keras.Input(shape=(feature_size,), name="features")
    x = keras.layers.Dropout(dropout, name="head_dropout")(features)
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(features, outputs, name="head")


def export_model(base: keras.Model, head: keras.Model, settings: TransferParams) -> keras.Model:
    """Raw uint8 images -> resize -> backbone preprocessing -> base -> pooling -> the trained head."""
    extractor = backbones.feature_extractor(base, settings.backbone, settings.image_size)
    return keras.Model(extractor.input, head(extractor.output), name=f"{settings.backbone}_transfer")


def unfreeze_top(base: keras.Model, layers: int) -> int:
    """Make the top `layers` layers of the base trainable; returns how many weights that frees."""
    base.trainable = True
    for layer in base.layers[: len(base.layers) - layers]:
        layer.trainable = False
    return sum(int(np.prod(w.shape)) for w in base.trainable_weights)


def fine_tune(
    model: keras.Model, base: keras.Model, train: Split, val: Split, params: Params, run: StageRun
) -> training.FitResult:
    settings = params.transfer
    freed = unfreeze_top(base, settings.fine_tune_layers)
    log.info("fine-tuning the top %d layers of %s (%d weights)", settings.fine_tune_layers, settings.backbone, freed)
    inputs = keras.Input(shape=(None, None, 3), name="image")
    augmented = build_augmenter(params.augment, params.seed)(inputs)
    trainer = keras.Model(inputs, model(augmented), name="fine_tune")  # shares the export's weights
    training.compile_classifier(trainer, settings.fine_tune_learning_rate, params.train)
    return training.fit(trainer, train, val, settings=params.train, epochs=settings.fine_tune_epochs, run=run)


def main() -> None:
    params = load_params()
    settings = params.transfer
    info = device.configure_training(params.train)
    with tracking.stage_run("transfer", params, info) as run:
        keras.utils.set_random_seed(params.seed)
        classes = imageset.load_classes(paths.PREPARED)
        train_features, val_features = cached_features(params)
        val = training.validation_set()
        name = f"{settings.backbone}_transfer"
        results: dict[str, Any] = {}
        curves_rows: list[dict[str, float]] = []
        with run.nested(name, {"model": name, **settings.model_dump(exclude={"weights_mirrors"})}):
            head = build_head(train_features.images.shape[1], len(classes), settings.dropout)
            training.compile_classifier(head, settings.learning_rate, params.train)
            phase1 = training.fit(head, train_features, val_features, settings=params.train, epochs=settings.epochs, run=run)
            results["head"] = phase1.summary
            curves_rows += [{**row, "phase": 1} for row in phase1.rows]
            run.images += phase1.images_seen

            base = backbones.base_model(settings.backbone, settings.image_size, backbones.weights_file(paths.WEIGHTS))
            model = export_model(base, head, settings)
            if settings.fine_tune_epochs:
                phase2 = fine_tune(model, base, training.training_set(params), val, params, run)
                results["fine_tune"] = phase2.summary
                offset = len(curves_rows)
                curves_rows += [{**row, "epoch": row["epoch"] + offset, "phase": 2} for row in phase2.rows]
                run.images += phase2.images_seen
            # Scored through the exported model on raw images: what evaluate and predict will run.
            probabilities = model.predict(val.images, batch_size=params.train.batch_size, verbose=0)
            results |= training.scores(val.labels, probabilities, "val_")
            run.log_active({k: v for k, v in results.items() if not isinstance(v, dict)})

        with fsio.atomic_dir(paths.TRANSFER_MODELS) as out, fsio.atomic_dir(paths.CURVES / "transfer") as curves:
            meta = training.model_meta(
                name, "transfer", params, classes,
                backbone=settings.backbone, backbone_image_size=settings.image_size,
                fine_tuned_layers=settings.fine_tune_layers if settings.fine_tune_epochs else 0,
                parameters=model.count_params(),
            )
            saved.save_keras(model, out, meta)
            training.write_curves(curves_rows, curves / f"{name}.json")
        run.log_metrics({name: results})
        log.info("%s: val accuracy %.4f", name, results["val_accuracy"])


if __name__ == "__main__":
    cli.run(main)
