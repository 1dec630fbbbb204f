"""One MLflow run per stage execution, its tags, and the same metrics in metrics/<stage>.json."""
import json

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
    assert found.info.status == "FINISHED" and found.info.run_name == "preprocess"
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
