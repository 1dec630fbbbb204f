"""The real thing: `dvc repro` of all stages and `dvc exp run` in a temporary copy, then MLflow and predict."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from .conftest import (
    REPO,
    free_port,
    nothing_but_the_source_check_ran,
    output,
    sh,
    wait_for,
    write_image,
)

STAGES = ("download", "preprocess", "augment", "baselines", "tune", "features", "transfer", "evaluate")
MODEL_STAGES = ("baselines", "tune", "features", "transfer", "evaluate")


@pytest.fixture
def project(e2e_project):
    return e2e_project


def stage_runs(root: Path) -> list:
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["image-pipeline"], output_format="list")


def metrics(root: Path, stage: str) -> dict:
    return json.loads((root / "metrics" / f"{stage}.json").read_text())


def test_every_stage_runs_and_a_second_repro_does_nothing(project):
    root, env, first = project
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first
        assert metrics(root, stage)["stage_seconds"] > 0
    prepared = metrics(root, "preprocess")
    assert prepared["images_in"] == 36 and prepared["quarantined"] == 0
    assert metrics(root, "augment")["augmented_images"] == 2 * prepared["split"]["train"]["images"]
    assert (root / "reports" / "augment_preview.png").stat().st_size > 0
    again = output(sh(root, "dvc", "repro", env=env))
    assert nothing_but_the_source_check_ran(again)
    assert json.loads(sh(root, "dvc", "status", "--json", env=env).stdout) == {"source": ["always changed"]}


def test_leaderboard_champion_and_reports(project):
    root, _, _ = project
    board = json.loads((root / "metrics" / "leaderboard.json").read_text())
    assert sorted(row["model"] for row in board) == sorted(
        ["random_forest", "mlp", "cnn3_small", "tuned_cnn3v2", "xception_transfer"]
    )
    chosen_by = [(row["val_accuracy"], row["val_f1"]) for row in board]
    assert chosen_by == sorted(chosen_by, reverse=True)  # ranked by validation, not by test
    assert all(row["test_ci_low"] <= row["test_accuracy"] <= row["test_ci_high"] for row in board)
    champion = json.loads((root / "data" / "models" / "champion.json").read_text())
    assert champion["champion_of"] == next(r["model"] for r in board if r["file"].endswith(".keras"))
    assert "| rank | model |" in (root / "reports" / "leaderboard.md").read_text()
    test_images = metrics(root, "preprocess")["split"]["test"]["images"]
    for row in board:
        assert (root / "reports" / "evaluate" / row["model"] / "confusion.png").stat().st_size > 0
        assert len(json.loads((root / "reports" / "predictions" / f"{row['model']}.json").read_text())) == test_images
    curves = json.loads((root / "reports" / "curves" / "baselines" / "cnn3_small.json").read_text())
    assert [row["epoch"] for row in curves] == [1, 2] and "val_accuracy" in curves[0]
    summary = metrics(root, "baselines")["models"]["cnn3_small"]
    assert summary["kept_val_accuracy"] == round(curves[summary["kept_epoch"] - 1]["val_accuracy"], 4)


def test_mlflow_runs_trials_and_registry(project):
    root, _, _ = project
    runs = stage_runs(root)
    assert sorted(r.data.tags["stage"] for r in runs if "mlflow.parentRunId" not in r.data.tags) == sorted(STAGES)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert {r.data.tags.get("trial") for r in children} >= {"trial_0", "trial_1"}
    assert sum(1 for r in children if r.data.tags["stage"] == "evaluate") == 5
    cnn = next(r for r in children if r.data.tags.get("model") == "cnn3_small" and r.data.tags["stage"] == "baselines")
    assert "val_accuracy" in cnn.data.metrics and "epoch_val_accuracy" in cnn.data.metrics
    champion = json.loads((root / "data" / "models" / "champion.json").read_text())
    registered = mlflow.MlflowClient().get_model_version_by_alias("image-classifier-tiny", "champion")
    assert str(registered.version) == "1" and registered.tags["dataset"] == "tiny"
    assert len(registered.tags["test_fingerprint"]) == 64
    assert registered.tags["model"] == champion["champion_of"]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["device.type"] == "cpu" and run.data.tags["git.commit"]
        assert run.info.artifact_uri.startswith((root / "mlruns" / "artifacts").as_uri())


def test_predict_with_the_champion(project):
    root, env, _ = project
    champion = json.loads((root / "data" / "models" / "champion.json").read_text())
    good = write_image(root / "query" / "good.jpg", size=(90, 70), seed=5)
    (root / "query" / "bad.jpg").write_text("not a jpeg")
    predicted = sh(root, sys.executable, "-m", "pipeline.predict", "--model", "data/models/champion.keras",
                   str(good), str(root / "query" / "bad.jpg"), env=env, check=False)
    assert predicted.returncode == 1, predicted.stderr
    lines = [json.loads(line) for line in predicted.stdout.splitlines()]
    assert lines[0]["label"] in champion["classes"] and "error" in lines[1]


def test_gpu_request_without_a_gpu_is_a_clear_error(project):
    root, env, _ = project
    env = {**env, "CUDA_VISIBLE_DEVICES": "-1"}  # no GPU, also on a machine that has one
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["device"] = "gpu"
    edited = root / "gpu-params"
    edited.mkdir()
    (edited / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    refused = sh(edited, sys.executable, "-m", "pipeline.stages.evaluate",
                 env={**env, "PYTHONPATH": str(root)}, check=False)
    assert refused.returncode == 2 and "TensorFlow sees no GPU" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_device_experiment_reruns_only_the_model_stages(project):
    root, env, _ = project
    sh(root, "git", "add", "-A", env=env)
    sh(root, "git", "commit", "-qm", "baseline", env=env)
    # Switching the device re-runs exactly the stages that train or infer, in a temporary copy
    # under .dvc/tmp/exps whose runs must still land in the workspace's store.
    exp = output(sh(root, "dvc", "exp", "run", "--temp", "-n", "on-auto", "-S", "train.device=auto", env=env))
    for stage in STAGES:
        assert (f"Running stage '{stage}'" in exp) == (stage in MODEL_STAGES), stage
    runs = [r for r in stage_runs(root) if "mlflow.parentRunId" not in r.data.tags]
    from_exp = [r for r in runs if r.data.tags["dvc.exp_name"]]
    assert sorted(r.data.tags["stage"] for r in from_exp) == sorted(MODEL_STAGES)
    assert {r.data.params.get("train.device") for r in from_exp} == {"auto"}
    shown = output(sh(root, "dvc", "exp", "show", "--no-pager", "--md", env=env))
    assert "on-auto" in shown and "images_per_second" in shown and "test_accuracy" in shown
    # MLflow tells the experiments apart: run names, the data each stage read (same data: same digest),
    # system metrics, and the evaluate run as the experiment's row.
    assert {r.info.run_name for r in from_exp} == {f"{stage} · on-auto" for stage in MODEL_STAGES}
    baseline = {r.data.tags["stage"]: r for r in runs if not r.data.tags["dvc.exp_name"]}
    for run in from_exp:
        [read] = run.inputs.dataset_inputs
        [before] = baseline[run.data.tags["stage"]].inputs.dataset_inputs
        assert read.dataset.name == "tiny" and read.dataset.digest == before.dataset.digest
        assert any(key.startswith("system/") for key in run.data.metrics)
    [row] = [r for r in from_exp if r.data.tags["stage"] == "evaluate"]
    assert row.data.params["train.device"] == "auto" and row.data.params["data.dataset"] == "tiny"
    assert "val_accuracy.random_forest" in row.data.metrics and "seconds_by_stage.baselines" in row.data.metrics


def test_the_runs_page_groups_runs_by_experiment_in_a_browser(project):
    """The MLflow UI in headless chromium: the shared view groups runs by dvc.exp_name; a screenshot is kept."""
    root, env, _ = project
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium here (Debian: apt-get install -y chromium)")
    experiment = next(r for r in stage_runs(root) if r.data.tags.get("dvc.exp_name") == "on-auto").info.experiment_id
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"],
        cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/health", server)
        url = f"http://127.0.0.1:{port}/#/experiments/{experiment}/runs?viewStateShareKey=by-experiment"
        screenshots = REPO / "reports" / "screenshots"
        screenshots.mkdir(parents=True, exist_ok=True)
        browse = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000",
                  "--window-size=1600,1000"]
        page = subprocess.run([*browse, "--dump-dom", url], capture_output=True, text=True, timeout=180, check=True).stdout
        shot = screenshots / "mlflow_runs_by_experiment.png"
        subprocess.run([*browse, f"--screenshot={shot}", url], capture_output=True, timeout=180, check=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert "Group by: dvc.exp_name" in page
    assert "on-auto" in page
    assert shot.stat().st_size > 10_000
