"""One MLflow run per stage execution, its tags, and the same metrics in metrics/<stage>.json."""
import hashlib
import json
import time

import mlflow
import pytest

from pipeline import device, paths, tracking


def finished_runs(workspace, params):
    mlflow.set_tracking_uri(f"sqlite:///{workspace / 'mlruns' / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=[params.mlflow.experiment], output_format="list")


def test_a_stage_run_is_tracked_and_mirrored_to_dvc_metrics(workspace, params):
    with tracking.stage_run("preprocess", params, device.cpu_only()) as run:
        run.images = 50
        run.record({"quarantined": 2, "split": {"train": {"images": 40}}})
    [found] = finished_runs(workspace, params)
    assert found.info.status == "FINISHED"
    assert found.info.run_name == f"preprocess · rps-{found.data.tags['params.hash'][:6]}"  # no DVC experiment
    tags = found.data.tags
    assert tags["stage"] == "preprocess" and tags["device.type"] == "cpu"
    assert len(tags["params.hash"]) == 16 and int(tags["cpu.cores"]) >= 1
    assert set(tags) >= {"git.commit", "dvc.exp_name", "tensorflow.version", "keras.version", "cpu.model"}
    # Exactly the params dvc.yaml lists for the stage.
    assert set(found.data.params) == {"seed"} | {f"preprocess.{k}" for k in
        ("image_size", "resize", "min_size", "max_pixels", "splits.train", "splits.val", "splits.test",
         "min_per_class", "workers")}
    assert found.data.metrics["split.train.images"] == 40
    written = json.loads((workspace / "metrics" / "preprocess.json").read_text())
    assert written["quarantined"] == 2 and written["split"] == {"train": {"images": 40}}
    assert written["images_per_second"] > 0 and written["stage_seconds"] >= written["tracking_seconds"] > 0
    assert written["peak_rss_mb"] > 50 and found.data.metrics["peak_rss_mb"] == written["peak_rss_mb"]
    assert found.info.artifact_uri.startswith((workspace / "mlruns" / "artifacts").as_uri())


def test_a_failing_stage_is_marked_failed_and_writes_no_metrics(workspace, params):
    with pytest.raises(RuntimeError):
        with tracking.stage_run("augment", params, device.cpu_only()):
            raise RuntimeError("boom")
    [found] = finished_runs(workspace, params)
    assert found.info.status == "FAILED"
    assert not (workspace / "metrics" / "augment.json").exists()


def test_params_hash_follows_only_the_stage_params(workspace, params):
    values = tracking.stage_params("augment", params)
    assert set(values) == {"seed", "augment"}
    other_device = params.model_copy(update={"train": params.train.model_copy(update={"device": "cpu"})})
    cpu = device.DeviceInfo("cpu", "x", 1)
    same = tracking.run_tags("augment", tracking.stage_params("augment", other_device), cpu)["params.hash"]
    assert same == tracking.run_tags("augment", values, cpu)["params.hash"]


def test_temporary_experiment_copies_track_into_the_workspace(tmp_path, monkeypatch, params):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    temp_copy = tmp_path / "project" / ".dvc" / "tmp" / "exps" / "tmpabc123"
    temp_copy.mkdir(parents=True)
    monkeypatch.chdir(temp_copy)
    assert paths.workspace_root() == tmp_path / "project"
    assert tracking.tracking_uri(params) == f"sqlite:///{tmp_path / 'project' / 'mlruns' / 'mlflow.db'}"
    assert paths.resolve_local("../shared/x") == tmp_path / "project" / "../shared/x"


def write_lock(workspace, prepared_md5, augmented_md5):
    """A dvc.lock as `dvc repro` leaves it once preprocess and augment have run."""
    (workspace / "dvc.lock").write_text(json.dumps({"schema": "2.0", "stages": {
        "preprocess": {"outs": [{"path": "data/prepared", "md5": prepared_md5}]},
        "augment": {"outs": [{"path": "data/augmented", "md5": augmented_md5}]},
    }}))


def test_runs_name_their_experiment_log_their_data_and_system_metrics(workspace, params, monkeypatch):
    """Two experiments on the same prepared data, one on other data: the Dataset column tells them apart."""
    monkeypatch.setattr(tracking, "SYSTEM_METRICS_SECONDS", 1)
    digests = {}
    for experiment, prepared in (("same-a", "aaa.dir"), ("same-b", "aaa.dir"), ("other", "bbb.dir")):
        monkeypatch.setenv("DVC_EXP_NAME", experiment)
        write_lock(workspace, prepared, "ccc.dir")
        with tracking.stage_run("augment", params, device.cpu_only()):
            time.sleep(2.5)  # long enough for a system-metrics sample
        [run] = [r for r in finished_runs(workspace, params) if r.data.tags["dvc.exp_name"] == experiment]
        assert run.info.run_name == f"augment · {experiment}"
        [dataset] = run.inputs.dataset_inputs
        assert dataset.dataset.name == "rps" and json.loads(dataset.dataset.source)["url"].startswith("https://github.com/")
        digests[experiment] = dataset.dataset.digest
        assert any(key.startswith("system/cpu_utilization") for key in run.data.metrics), sorted(run.data.metrics)
        assert any(key.startswith("system/system_memory_usage") for key in run.data.metrics)
    assert digests["same-a"] == digests["same-b"] == "aaa.dir" != digests["other"] == "bbb.dir"
    experiment = mlflow.get_experiment_by_name(params.mlflow.experiment)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_data_digest_is_the_prepared_sets_or_the_downloaded_tars(workspace):
    write_lock(workspace, "aaa.dir", "ccc.dir")
    assert tracking.data_digest("augment") == tracking.data_digest("evaluate") == "aaa.dir"  # data/prepared
    (workspace / "data").mkdir()
    (workspace / "data" / "raw.tar").write_bytes(b"tar bytes")
    assert tracking.data_digest("download") == hashlib.md5(b"tar bytes").hexdigest()
    assert tracking.data_digest("preprocess") is None  # the lock has no download entry yet
    (workspace / "dvc.lock").unlink()
    assert tracking.data_digest("augment") is None


def test_the_evaluate_run_is_the_experiments_row(workspace, params):
    (workspace / "metrics").mkdir()
    (workspace / "metrics" / "baselines.json").write_text(json.dumps({"stage_seconds": 12.5}))
    with tracking.stage_run("evaluate", params, device.cpu_only()) as run:
        run.log_experiment(params)
        run.record({"val_accuracy": {"cnn": 0.7}, "test_accuracy": {"cnn": 0.6}})
    [row] = mlflow.search_runs(experiment_names=[params.mlflow.experiment], filter_string="tags.stage = 'evaluate'",
                               output_format="list")
    flat = tracking.flatten(params.model_dump(mode="json"))
    assert set(row.data.params) == set(flat) and row.data.params["preprocess.image_size"] == "128"
    assert row.data.metrics["val_accuracy.cnn"] == 0.7 and row.data.metrics["test_accuracy.cnn"] == 0.6
    assert row.data.metrics["seconds_by_stage.baselines"] == 12.5
