"""The real thing: `dvc repro` and `dvc exp run` in a temporary copy of the project, then MLflow."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from .conftest import REPO, make_dataset


def sh(cwd: Path, *args: str, env: dict) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    return done.stdout + done.stderr


@pytest.fixture
def project(tmp_path):
    """A git+DVC project holding this repo's pipeline, configured for a tiny generated dataset."""
    root = tmp_path / "project"
    root.mkdir()
    shutil.copytree(REPO / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    photos = make_dataset(tmp_path / "photos", classes=3, shots=4, frames=3, size=(80, 60))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"] = {"dataset": "tiny", "datasets": {"tiny": {"source": str(photos)}}}
    params["preprocess"].update(image_size=32, min_size=16)
    params["augment"].update(copies=2, preview_images=3)
    params["transfer"].update(weights="none")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # dvc.yaml's `python`
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    sh(root, "git", "init", "-q", env=env)
    sh(root, "dvc", "init", "-q", env=env)
    sh(root, "dvc", "config", "core.analytics", "false", env=env)
    return root, env


def stage_runs(root: Path) -> list:
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["image-pipeline"], output_format="list")


def test_repro_noop_experiment_and_tracking(project):
    root, env = project
    first = sh(root, "dvc", "repro", env=env)
    for stage in ("download", "preprocess", "augment"):
        assert f"Running stage '{stage}'" in first
        assert (root / "metrics" / f"{stage}.json").exists()
    prepared = json.loads((root / "metrics" / "preprocess.json").read_text())
    assert prepared["images_in"] == 36 and prepared["quarantined"] == 0
    augmented = json.loads((root / "metrics" / "augment.json").read_text())
    assert augmented["augmented_images"] == 2 * prepared["split"]["train"]["images"]
    assert (root / "reports" / "augment_preview.png").stat().st_size > 0

    again = sh(root, "dvc", "repro", env=env)
    assert "Data and pipelines are up to date" in again and "Running stage" not in again
    assert len(stage_runs(root)) == 3

    sh(root, "git", "add", "-A", env=env)
    sh(root, "git", "commit", "-qm", "baseline", env=env)
    # A temporary copy under .dvc/tmp/exps: its runs must still land in the workspace's store.
    exp = sh(root, "dvc", "exp", "run", "--temp", "-n", "size40", "-S", "preprocess.image_size=40", env=env)
    assert "Running stage 'download'" not in exp
    assert "Running stage 'preprocess'" in exp and "Running stage 'augment'" in exp

    runs = stage_runs(root)
    assert sorted(r.data.tags["stage"] for r in runs) == ["augment", "augment", "download", "preprocess", "preprocess"]
    from_exp = [r for r in runs if r.data.tags["dvc.exp_name"]]
    assert {r.data.tags["dvc.exp_name"] for r in from_exp} == {"size40"}
    assert {r.data.params.get("preprocess.image_size") for r in from_exp} == {"40", None}
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["device.type"] == "cpu" and run.data.tags["git.commit"]
        assert run.info.artifact_uri.startswith((root / "mlruns" / "artifacts").as_uri())

    shown = sh(root, "dvc", "exp", "show", "--no-pager", "--md", env=env)
    assert "size40" in shown and "images_per_second" in shown
