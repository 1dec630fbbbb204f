"""Keras Tuner: one nested MLflow run per trial; a search resumes where it stopped, and only the same search."""
import logging
import shutil

import keras
import mlflow
import numpy as np
import pytest
import yaml

from pipeline import device, fsio, imageset, paths, tracking
from pipeline.errors import UserError
from pipeline.models.layers import build_augmenter
from pipeline.stages import augment, tune

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
    key = tune.search_key(small, "data-a", "code-a")
    assert key == tune.search_key(small, "data-a", "code-a")
    assert key != tune.search_key(small, "data-b", "code-a")
    assert key != tune.search_key(small, "data-a", "code-b")
    more_trials = small.model_copy(update={"tune": small.tune.model_copy(update={"max_trials": 4})})
    assert key != tune.search_key(more_trials, "data-a", "code-a")
    longer_retrain = small.model_copy(update={"tune": small.tune.model_copy(update={"final_epochs": 99})})
    assert key == tune.search_key(longer_retrain, "data-a", "code-a")


def with_augment(params, **changes):
    return params.model_copy(update={"augment": params.augment.model_copy(update=changes)})


def test_search_key_sees_on_the_fly_augmentation_not_the_augment_stage_alone(small):
    on_the_fly = small.model_copy(update={"train": small.train.model_copy(update={"augment_on_the_fly": True})})
    key = tune.search_key(on_the_fly, "data-a", "code-a")
    assert key != tune.search_key(with_augment(on_the_fly, rotation=0.2), "data-a", "code-a")
    assert key == tune.search_key(with_augment(on_the_fly, preview_images=3, copies=5), "data-a", "code-a")
    # Offline, augment's params reach the trials only through data/augmented: data_fingerprint() sees that.
    assert tune.search_key(small, "data-a", "code-a") == tune.search_key(with_augment(small, rotation=0.2), "data-a", "code-a")


def test_the_trial_code_in_the_key_is_among_the_stage_deps():
    """The key hashes the files a trial runs; DVC re-runs the stage when they change only if they are deps."""
    deps = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["tune"]["deps"]
    for path in tune.TRIAL_CODE:
        relative = path.resolve().relative_to(REPO).as_posix()
        assert any(relative == dep or relative.startswith(dep + "/") for dep in deps), relative
    assert {"cnn.py", "training.py"} <= {path.name for path in tune.TRIAL_CODE}  # the model, its training


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
    assert tune.search_key(changed, "data-a", "c") != tune.search_key(small, "data-a", "c")


def write_prepared():
    """data/prepared as preprocess leaves it, small: train, val, class names."""
    rng = np.random.default_rng(0)
    for name, count in (("train", 24), ("val", 9)):
        split_on_disk(paths.PREPARED, rng.integers(0, 256, (count, 20, 20, 3), dtype=np.uint8), np.arange(count) % 3, name)
    fsio.write_json(paths.PREPARED / "classes.json", ["a", "b", "c"])


def write_augmented(params):
    """data/augmented as the augment stage writes it for `params`, with its own code."""
    keras.utils.set_random_seed(params.seed)
    train = imageset.load_split(paths.PREPARED, "train")
    with fsio.atomic_dir(paths.AUGMENTED) as out, imageset.SplitWriter(out, "train", train.shape, np.uint8) as writer:
        augment.write_copies(train, params.augment.copies, build_augmenter(params.augment, params.seed),
                             params.augment.batch_size, writer)


def run_search(params):
    """The search as the stage's main() runs it: (its key, trials run now)."""
    classes, train, val, keep, project = tune.prepared(params)
    with tracking.stage_run("tune", params, device.cpu_only()) as run:
        tuner = tune.open_search(params, len(classes), project, run)
        tune.search(tuner, train, val, params, keep)
    return project, tuner.trials_run


def test_a_search_resumes_only_on_the_same_images(small, caplog):
    caplog.set_level(logging.INFO, logger="tune")
    small = small.model_copy(update={"tune": small.tune.model_copy(update={"max_trials": 2})})
    write_prepared()
    write_augmented(small)
    first, ran = run_search(small)
    assert ran == 2

    others = small.model_copy(update={  # what other stages read: not the search's business
        "transfer": small.transfer.model_copy(update={"epochs": 99, "dropout": 0.5}),
        "evaluate": small.evaluate.model_copy(update={"top_k": 2}),
    })
    assert run_search(others) == (first, 0)  # resumed: nothing left to run
    assert f"search {first} resumes: 2 trials already in data/tuner" in caplog.text

    rotated = with_augment(small, rotation=0.2)
    write_augmented(rotated)  # as `dvc repro` re-runs augment first: other augmented images
    second, ran = run_search(rotated)
    assert second != first and ran == 2
    assert [p.name for p in paths.TUNER.iterdir()] == [second]
    assert f"search {second} starts afresh; removed the searches on other data, code or params from data/tuner: {first}" in caplog.text


def test_a_search_where_no_trial_completed_is_one_line(small, tmp_path):
    train, val = tiny_split(tmp_path / "train"), tiny_split(tmp_path / "val", 9, seed=1)
    with tracking.stage_run("tune", small, device.cpu_only()) as run:
        tuner = tune.make_tuner(small, 2, "failing", run)  # labels 0-2 for 2 classes: every fit fails
        tune.search(tuner, train, val, small, keep=None)  # to its end: 3 failures in a row do not stop it
        with pytest.raises(UserError) as caught:
            tune.best_completed(tuner.oracle, "failing")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        "none of the search's 3 trials completed; the last failure: Received a label value of 2 which is outside "
        "the valid range of [0, 2)."
    )
    assert message.endswith("(each trial's message is in data/tuner/failing/trial_*/trial.json)")
