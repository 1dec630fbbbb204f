"""Keras Tuner: one nested MLflow run per trial, and an interrupted search resumes where it stopped."""
import shutil

import mlflow
import numpy as np
import pytest

from pipeline import device, tracking
from pipeline.imageset import Split
from pipeline.stages import tune

from .conftest import REPO


@pytest.fixture
def small(params, tmp_path, monkeypatch):
    """Tiny search settings, run in a scratch workspace (its own mlruns/ and data/tuner/)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    return params.model_copy(update={
        "tune": params.tune.model_copy(update={"max_trials": 3, "epochs": 1, "image_size": 16}),
        "train": params.train.model_copy(update={"batch_size": 8, "early_stopping_patience": 0}),
    })


def tiny_split(count=24, seed=0):
    rng = np.random.default_rng(seed)
    return Split(rng.integers(0, 256, (count, 20, 20, 3), dtype=np.uint8), np.arange(count, dtype=np.int32) % 3)


def trial_runs(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["image-pipeline"], output_format="list")
    return sorted((r.data.tags["trial"], r.info.status) for r in runs if "trial" in r.data.tags)


def test_interrupted_search_resumes_without_rerunning_finished_trials(small, tmp_path):
    train, val = tiny_split(), tiny_split(9, seed=1)
    with pytest.raises(KeyboardInterrupt), tracking.stage_run("tune", small, device.cpu_only()) as run:
        tuner = tune.make_tuner(small, 3, "resume-test", run)

        def interrupt_second_trial(trial, model, epoch, logs=None):
            if tuner.trials_run == 1:
                raise KeyboardInterrupt  # as Ctrl-C in the middle of trial 2
            type(tuner).on_epoch_end(tuner, trial, model, epoch, logs)

        tuner.on_epoch_end = interrupt_second_trial
        tune.search(tuner, train, val, small)
    assert trial_runs(tmp_path) == [("trial_0", "FINISHED"), ("trial_1", "FAILED")]

    with tracking.stage_run("tune", small, device.cpu_only()) as run:
        resumed = tune.make_tuner(small, 3, "resume-test", run)
        tune.search(resumed, train, val, small)
    assert resumed.trials_run == 2  # trial 1 again, then trial 2; trial 0 was kept
    assert sorted(resumed.oracle.trials) == ["0", "1", "2"]
    assert all(t.status == "COMPLETED" for t in resumed.oracle.trials.values())
    assert trial_runs(tmp_path) == [
        ("trial_0", "FINISHED"), ("trial_1", "FAILED"), ("trial_1", "FINISHED"), ("trial_2", "FINISHED")
    ]


def test_search_key_changes_with_the_search_not_with_the_retraining(small):
    key = tune.search_key(small, "data-a")
    assert key == tune.search_key(small, "data-a")
    assert key != tune.search_key(small, "data-b")
    more_trials = small.model_copy(update={"tune": small.tune.model_copy(update={"max_trials": 4})})
    assert key != tune.search_key(more_trials, "data-a")
    longer_retrain = small.model_copy(update={"tune": small.tune.model_copy(update={"final_epochs": 99})})
    assert key == tune.search_key(longer_retrain, "data-a")


def test_subset_is_stratified_and_seeded():
    split = Split(np.zeros((30, 4, 4, 3), np.uint8), np.repeat(np.arange(3, dtype=np.int32), 10))
    half = tune.subset(split, 0.5, seed=0)
    assert np.bincount(half.labels).tolist() == [5, 5, 5]
    assert tune.subset(split, 1.0, seed=0) is split
