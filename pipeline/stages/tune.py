"""tune stage: Keras Tuner over the cnn3v2 family -> the best hyperparameters, retrained, in data/models/tuned.

Each trial is a nested MLflow run, opened and closed by the tuner's own trial hooks (callbacks
given to `search` are deep-copied per trial, so they cannot hold a tracking handle). The tuner's
directory is a persistent DVC output keyed by the search's configuration: an interrupted search
resumes where it stopped, and a changed one starts afresh beside it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from contextlib import ExitStack
from typing import Any

import keras
import keras_tuner as kt
import numpy as np

from pipeline import cli, fsio, imageset, paths, training
from pipeline.imageset import Split
from pipeline.models import cnn, saved
from pipeline.params import Params
from pipeline.scores import scores
from pipeline.tracking import StageRun

log = logging.getLogger("tune")
MODEL_NAME = "tuned_cnn3v2"
_TUNERS = {"random": kt.RandomSearch, "hyperband": kt.Hyperband, "bayesian": kt.BayesianOptimization}


def build_hypermodel(params: Params, num_classes: int) -> Any:
    """hp -> a compiled cnn3v2-family model, each hyperparameter drawn from tune.space."""
    space = params.tune.space

    def build(hp: kt.HyperParameters) -> keras.Model:
        family = cnn.Cnn3v2(
            filters=hp.Choice("filters", space.filters),
            kernel_size=hp.Choice("kernel_size", space.kernel_size),
            dropout=bool(hp.Choice("dropout", space.dropout)),
            dense_units=hp.Choice("dense_units", space.dense_units),
        )
        learning_rate = hp.Float("learning_rate", *space.learning_rate, sampling="log")
        model = cnn.classifier(MODEL_NAME, family.body, params.tune.image_size, num_classes)
        return training.compile_classifier(model, learning_rate, params.train)

    return build


class MlflowTrials:
    """Mixin for a keras-tuner Tuner: one nested MLflow run per trial, with its epochs and score."""

    def __init__(self, *args: Any, stage_run: StageRun, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stage_run = stage_run
        self._trial_run: ExitStack | None = None
        self.trials_run = 0  # trials this process ran (not those reloaded from an earlier search)
        self.epochs_run = 0

    def on_trial_begin(self, trial: kt.engine.trial.Trial) -> None:
        super().on_trial_begin(trial)
        self._trial_run = ExitStack()
        self._trial_run.enter_context(
            self.stage_run.nested(f"trial_{trial.trial_id}", trial.hyperparameters.values, kind="trial")
        )

    def on_epoch_end(self, trial: Any, model: Any, epoch: int, logs: dict[str, Any] | None = None) -> None:
        super().on_epoch_end(trial, model, epoch, logs)
        self.epochs_run += 1
        self.stage_run.log_now({f"epoch_{k}": float(v) for k, v in (logs or {}).items()}, step=epoch + 1)

    def on_trial_end(self, trial: kt.engine.trial.Trial) -> None:
        super().on_trial_end(trial)  # the oracle records the score and saves its state
        best = trial.metrics.get_best_value("val_accuracy") if trial.metrics.exists("val_accuracy") else None
        self.stage_run.set_tags({"trial.status": str(trial.status)})
        if best is not None:
            self.stage_run.log_now({"val_accuracy": float(best)})
        self._close_trial_run(None, None, None)
        self.trials_run += 1

    def search(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().search(*args, **kwargs)
        except BaseException:  # an interrupted trial's run ends FAILED; the tuner's state resumes it
            self._close_trial_run(*sys.exc_info())
            raise

    def _close_trial_run(self, *exc_info: Any) -> None:
        if self._trial_run is not None:
            self._trial_run.__exit__(*exc_info)
            self._trial_run = None


def search_key(params: Params, data_fingerprint: str) -> str:
    """Names the tuner's project: the same search (space included) on the same data resumes; any change starts anew."""
    scope = {
        "seed": params.seed,
        "tune": params.tune.model_dump(exclude={"final_epochs"}),
        "train": params.train.model_dump(exclude={"device"}),
        "augment": params.augment.model_dump() if params.train.augment_on_the_fly else None,
        "data": data_fingerprint,
    }
    return hashlib.sha256(json.dumps(scope, sort_keys=True).encode()).hexdigest()[:16]


def make_tuner(params: Params, num_classes: int, project: str, run: StageRun) -> Any:
    settings = params.tune
    limits = {"max_epochs": settings.epochs} if settings.algorithm == "hyperband" else {"max_trials": settings.max_trials}
    tuner_class = type(f"Tracked{_TUNERS[settings.algorithm].__name__}", (MlflowTrials, _TUNERS[settings.algorithm]), {})
    return tuner_class(
        build_hypermodel(params, num_classes),
        objective="val_accuracy",
        seed=params.seed,
        directory=str(paths.TUNER),
        project_name=project,
        overwrite=False,
        stage_run=run,
        **limits,
    )


def subset_mask(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray | None:
    """A stratified `fraction` of the train images (by row), to search on part of the data as the seed did.

    None keeps everything. Every class keeps at least one image, however few it has (scikit-learn's
    stratified split refuses a class of one). Augmented copies follow their source image in or out.
    """
    if fraction >= 1:
        return None
    rng = np.random.default_rng(seed)
    keep = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        keep[rng.choice(rows, max(1, round(fraction * len(rows))), replace=False)] = True
    return keep


def search(tuner: Any, train: Split, val: Split, params: Params, keep: np.ndarray | None) -> None:
    on_the_fly = training.on_the_fly(params)
    tuner.search(
        imageset.stream(train, params.train.batch_size, shuffle_seed=params.seed, keep=keep, **on_the_fly),
        validation_data=imageset.stream(val, params.train.batch_size),
        epochs=params.tune.epochs,
        shuffle=False,  # the stream shuffles
        callbacks=training.plateau_callbacks(params.train),  # plain Keras callbacks: safe to deep-copy
        verbose=2,
    )


@cli.stage("tune")
def main(params: Params, run: StageRun) -> None:
    classes, train, val = training.load_train_val(params)
    keep = subset_mask(imageset.load_split(paths.PREPARED, "train").labels, params.tune.subset, params.seed)
    searched = params.train.on_the_fly_copies * imageset.streamed(train, keep)  # images per search epoch
    fingerprint = hashlib.sha256((paths.PREPARED / "manifest.json").read_bytes()).hexdigest()
    project = search_key(params, fingerprint)
    tuner = make_tuner(params, len(classes), project, run)
    start = time.perf_counter()
    search(tuner, train, val, params, keep)
    search_seconds = time.perf_counter() - start
    best_trial = tuner.oracle.get_best_trials(1)[0]
    best_hp = best_trial.hyperparameters
    log.info("best of %d trials: %s (val accuracy %.4f)", len(tuner.oracle.trials), best_hp.values, best_trial.score)

    with run.nested(MODEL_NAME, {"model": MODEL_NAME, **best_hp.values, "epochs": params.tune.final_epochs}):
        keras.utils.set_random_seed(params.seed)
        model = tuner.hypermodel.build(best_hp)
        result = training.fit(
            model, train, val, settings=params.train, epochs=params.tune.final_epochs, run=run, seed=params.seed,
            **training.on_the_fly(params),
        )
        probabilities = training.predict(model, val, params.train.batch_size)
        final = {**scores(val.labels, probabilities, "val_"), **result.summary}
        run.log_now(final)
    with fsio.atomic_dir(paths.TUNED_MODELS) as out, fsio.atomic_dir(paths.CURVES / "tune") as curves:
        meta = saved.model_meta(
            MODEL_NAME, "tune", params, classes, hyperparameters=best_hp.values, parameters=model.count_params()
        )
        saved.save_keras(model, out, meta)
        training.write_curves(result.rows, curves / f"{MODEL_NAME}.json")

    run.images = result.images_seen + tuner.epochs_run * searched
    run.set_tags({"tune.project": project})
    run.record({
        "search": {
            "trials": len(tuner.oracle.trials),
            "trials_run_now": tuner.trials_run,
            "searched_images": searched,
            "seconds": round(search_seconds, 3),
            "best_val_accuracy": round(float(best_trial.score), 4),
            "best": best_hp.values,
        },
        MODEL_NAME: final,
    })


if __name__ == "__main__":
    main()
