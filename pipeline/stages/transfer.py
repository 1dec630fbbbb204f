"""transfer stage: a head on the cached backbone features, optional fine-tuning -> one exported model.

Phase 1 trains the head (dropout -> dense) on data/features: many epochs cost seconds.
Phase 2 (transfer.fine_tune_epochs > 0) unfreezes the top transfer.fine_tune_layers of the base
at a low learning rate, with augmentation in the input stream and BatchNorm in inference mode (the
base is called with training=False), as the Keras transfer-learning guide does. The export takes raw
uint8 images of any size: resizing and the backbone's preprocessing are inside.
"""
from __future__ import annotations

import logging
from typing import Any

import keras
import numpy as np

from pipeline import cli, fsio, imageset, paths, training
from pipeline.imageset import Split
from pipeline.models import backbones, saved
from pipeline.models.layers import build_augmenter
from pipeline.params import Params, TransferParams
from pipeline.scores import scores
from pipeline.tracking import StageRun

log = logging.getLogger("transfer")


def cached_features(params: Params) -> tuple[Split, Split]:
    """Train (with the augmented copies' features when train.use_augmented) and val features."""
    train = imageset.load_split(paths.FEATURES, "train")
    if params.train.use_augmented:
        train = imageset.joined(train, imageset.load_split(paths.FEATURES, "augmented"))
    return train, imageset.load_split(paths.FEATURES, "val")


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
    """Train the export itself, top base layers unfrozen, on a stream of images augmented on the fly."""
    settings = params.transfer
    freed = unfreeze_top(base, settings.fine_tune_layers)
    log.info("fine-tuning the top %d layers of %s (%d weights)", settings.fine_tune_layers, settings.backbone, freed)
    training.compile_classifier(model, settings.fine_tune_learning_rate, params.train)
    return training.fit(
        model, train, val, settings=params.train, epochs=settings.fine_tune_epochs, run=run, seed=params.seed,
        augmenter=build_augmenter(params.augment, params.seed), copies=params.train.on_the_fly_copies,
    )


@cli.stage("transfer")
def main(params: Params, run: StageRun) -> None:
    settings = params.transfer
    keras.utils.set_random_seed(params.seed)
    classes = imageset.load_classes(paths.PREPARED)
    train_features, val_features = cached_features(params)
    val = training.validation_set()
    name = f"{settings.backbone}_transfer"
    results: dict[str, Any] = {}
    curves_rows: list[dict[str, float]] = []
    with run.nested(name, {"model": name, **settings.model_dump(exclude={"weights_mirrors"})}):
        head = backbones.build_head(train_features.shape[0], len(classes), settings.dropout)
        training.compile_classifier(head, settings.learning_rate, params.train)
        phase1 = training.fit(
            head, train_features, val_features, settings=params.train, epochs=settings.epochs, run=run, seed=params.seed
        )
        results["head"] = phase1.summary
        curves_rows += [{**row, "phase": 1} for row in phase1.rows]
        run.images += phase1.images_seen

        base = backbones.base_model(
            settings.backbone, settings.image_size, backbones.weights_file(paths.WEIGHTS), settings.features_block
        )
        model = export_model(base, head, settings)
        if settings.fine_tune_epochs:
            phase2 = fine_tune(model, base, training.training_set(params), val, params, run)
            results["fine_tune"] = phase2.summary
            offset = len(curves_rows)
            curves_rows += [{**row, "epoch": row["epoch"] + offset, "phase": 2} for row in phase2.rows]
            run.images += phase2.images_seen
        # Scored through the exported model on raw images: what evaluate and predict will run.
        probabilities = training.predict(model, val, params.train.batch_size)
        results |= scores(val.labels, probabilities, "val_")
        run.log_now({k: v for k, v in results.items() if not isinstance(v, dict)})

    with fsio.atomic_dir(paths.TRANSFER_MODELS) as out, fsio.atomic_dir(paths.CURVES / "transfer") as curves:
        meta = saved.model_meta(
            name, "transfer", params, classes,
            backbone=settings.backbone, backbone_image_size=settings.image_size, features_block=settings.features_block,
            fine_tuned_layers=settings.fine_tune_layers if settings.fine_tune_epochs else 0,
            parameters=model.count_params(),
        )
        saved.save_keras(model, out, meta)
        training.write_curves(curves_rows, curves / f"{name}.json")
    run.record({name: results})
    log.info("%s: val accuracy %.4f", name, results["val_accuracy"])


if __name__ == "__main__":
    main()
