"""baselines stage: the seeds' models on the same data -> data/models/baselines + learning curves.

scikit-learn models (random forest, logistic regression) see downscaled pixels, gathered a batch
at a time; the Keras ones (MLP, the MNIST CNN, the chifoumi/cats-vs-dogs CNN, the dog-breed CNNs)
train on a stream of the shards with the seeds' callbacks. Each model is one nested MLflow run
with its params, curves and timings.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from pipeline import cli, fsio, paths, training
from pipeline.imageset import Split
from pipeline.models import classic, cnn, saved
from pipeline.params import Params
from pipeline.scores import scores
from pipeline.tracking import StageRun

log = logging.getLogger("baselines")


def train_classic(
    name: str, train: Split, val: Split, params: Params, classes: list[str], out: Path
) -> tuple[dict[str, Any], int]:
    """Fit, score on val, save; returns the scores and the number of images trained on."""
    size = params.baselines.pixels_size
    start = time.perf_counter()
    model = classic.estimator(name, params.seed, params.baselines.forest_trees, params.baselines.forest_max_leaf_nodes)
    model.fit(classic.split_pixels(train, size), train.labels)
    seconds = time.perf_counter() - start
    probabilities = model.predict_proba(classic.split_pixels(val, size))
    saved.save_classic(model, out, saved.model_meta(name, "baselines", params, classes, pixels_size=size))
    found = {
        **scores(val.labels, probabilities, "val_"),
        "train_seconds": round(seconds, 3),
        "train_images_per_second": round(train.count / seconds, 2),
    }
    return found, train.count


def train_keras(
    name: str, train: Split, val: Split, params: Params, classes: list[str], out: Path, curves: Path, run: StageRun
) -> tuple[dict[str, Any], int]:
    settings = params.baselines
    model = cnn.build(name, params.preprocess.image_size, settings.pixels_size, len(classes), settings.normalize)
    training.compile_classifier(model, settings.learning_rate, params.train)
    result = training.fit(
        model, train, val, settings=params.train, epochs=settings.epochs, run=run, seed=params.seed,
        **training.on_the_fly(params),
    )
    training.write_curves(result.rows, curves / f"{name}.json")
    probabilities = training.predict(model, val, params.train.batch_size)
    saved.save_keras(model, out, saved.model_meta(name, "baselines", params, classes, parameters=model.count_params()))
    return {**scores(val.labels, probabilities, "val_"), **result.summary}, result.images_seen


def model_params(name: str, params: Params) -> dict[str, Any]:
    """What a model's nested run records: its own settings, not the whole stage's."""
    if name in classic.CLASSIC_BASELINES:
        settings = params.baselines
        forest = {"trees": settings.forest_trees, "max_leaf_nodes": settings.forest_max_leaf_nodes}
        return {"model": name, "pixels_size": settings.pixels_size, **(forest if name == "random_forest" else {})}
    return {
        "model": name,
        "input_size": params.baselines.pixels_size if name in cnn.SMALL_INPUT else params.preprocess.image_size,
        "epochs": params.baselines.epochs,
        "learning_rate": params.baselines.learning_rate,
        "normalize": params.baselines.normalize,
        **params.train.model_dump(),
    }


@cli.stage("baselines")
def main(params: Params, run: StageRun) -> None:
    classes, train, val = training.load_train_val(params)
    results: dict[str, dict[str, Any]] = {}
    with fsio.atomic_dir(paths.BASELINE_MODELS) as out, fsio.atomic_dir(paths.CURVES / "baselines") as curves:
        for name in params.baselines.models:
            log.info("training %s on %d images", name, train.count)
            with run.nested(name, model_params(name, params)):
                if name in classic.CLASSIC_BASELINES:
                    result, seen = train_classic(name, train, val, params, classes, out)
                else:
                    result, seen = train_keras(name, train, val, params, classes, out, curves, run)
                run.images += seen
                run.log_now(result)
            results[name] = result
            log.info("%s: val accuracy %.4f", name, result["val_accuracy"])
    run.record({"train_images": train.count, "val_images": val.count, "models": results})


if __name__ == "__main__":
    main()
