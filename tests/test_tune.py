"""Keras Tuner: one nested MLflow run per trial, and an interrupted search resumes where it stopped."""
import shutil

import mlflow
import numpy as np
import pytest

from pipeline import device, imageset, tracking
from pipeline.stages import tune

from .conftest import REPO, split_on_disk


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


def tiny_split(directory, count=24, seed=0):
    rng = np.random.default_rng(seed)
    return split_on_disk(directory, rng.integers(0, 256, (count, 20, 20, 3), dtype=np.uint8), np.arange(count) % 3)


def trial_runs(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["image-pipeline"], output_format="list")
    return sorted((r.data.tags["trial"], r.info.status) for r in runs if "trial" in r.data.tags)


def test_interrupted_search_resumes_without_rerunning_finished_trials(small, tmp_path):
    train, val = tiny_split(tmp_path / "train"), tiny_split(tmp_path / "val", 9, seed=1)
    with pytest.raises(KeyboardInterrupt), tracking.stage_run("tune", small, device.cpu_only()) as run:
        tuner = tune.make_tuner(small, 3, "resume-test", run)

        def interrupt_second_trial(trial, model, epoch, logs=None):
            if tuner.trials_run == 1:
                raise KeyboardInterrupt  # as Ctrl-C in the middle of trial 2
            type(tuner).on_epoch_end(tuner, trial, model, epoch, logs)

        tuner.on_epoch_end = interrupt_second_trial
        tune.search(tuner, train, val, small, keep=None)
    assert trial_runs(tmp_path) == [("trial_0", "FINISHED"), ("trial_1", "FAILED")]

    with tracking.stage_run("tune", small, device.cpu_only()) as run:
        resumed = tune.make_tuner(small, 3, "resume-test", run)
        tune.search(resumed, train, val, small, keep=None)
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


def test_subset_is_stratified_seeded_and_streams_only_the_kept_sources(tmp_path):
    labels = np.repeat(np.arange(3), 10)
    keep = tune.subset_mask(labels, 0.5, seed=0)
    assert np.bincount(labels[keep]).tolist() == [5, 5, 5]
    np.testing.assert_array_equal(keep, tune.subset_mask(labels, 0.5, seed=0))
    assert tune.subset_mask(labels, 1.0, seed=0) is None
    lonely = np.array([0] + [1] * 10)  # a class with one train image keeps it
    assert np.bincount(lonely[tune.subset_mask(lonely, 0.5, seed=0)]).tolist() == [1, 5]

    images = np.arange(30, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    split = split_on_disk(tmp_path, images, labels)
    seen = np.concatenate([x.numpy()[:, 0, 0, 0] for x, _ in imageset.stream(split, 4, shuffle_seed=1, keep=keep)])
    assert sorted(seen.astype(int).tolist()) == np.flatnonzero(keep).tolist()
    assert imageset.streamed(split, keep) == 15


def test_search_key_sees_the_search_space(small):
    wider = small.tune.space.model_copy(update={"filters": [16, 32, 64]})
    changed = small.model_copy(update={"tune": small.tune.model_copy(update={"space": wider})})
    assert tune.search_key(changed, "data-a") != tune.search_key(small, "data-a")
