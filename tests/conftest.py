"""Shared fixtures: small generated photo folders, and the real ../shared data when present."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline import imageset
from pipeline.params import Params, load_params

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DOWNLOAD_LIMITS = load_params(REPO / "params.yaml").download


def write_image(path: Path, size: tuple[int, int] = (64, 48), seed: int = 0, mode: str = "RGB", fmt: str | None = None) -> Path:
    """A random-noise image with a coloured block, so resizing and rotation are visible in tests."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    pixels[: size[1] // 2, : size[0] // 2] = (255, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path, format=fmt)
    return path


def make_dataset(root: Path, classes: int = 3, shots: int = 4, frames: int = 2, size=(64, 48)) -> Path:
    """Class-per-folder JPEGs named like rps bursts: <shot>.jpg, <shot>_1.jpg, ..."""
    for c in range(classes):
        for s in range(shots):
            for f in range(frames):
                name = f"shot{s}.jpg" if f == 0 else f"shot{s}_{f}.jpg"
                write_image(root / f"class{c}" / name, size=size, seed=c * 1000 + s * 10 + f)
    return root


def split_on_disk(directory: Path, x: np.ndarray, labels, name: str = "split") -> imageset.Split:
    """Examples (images or features) written as an on-disk split, as the stages exchange them."""
    directory.mkdir(parents=True, exist_ok=True)
    with imageset.SplitWriter(directory, name, x.shape[1:], x.dtype) as writer:
        writer.write(x, np.asarray(labels, dtype=np.int32), np.arange(len(x)))
    return imageset.load_split(directory, name)


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A scratch project directory as the working directory: dvc.yaml (the stages' params lists) and the
    default sqlite MLflow store under it."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    return tmp_path


@pytest.fixture
def params() -> Params:
    return load_params(REPO / "params.yaml")


@pytest.fixture
def shared_rps() -> Path:
    rps = SHARED / "datasets" / "rps"
    if not rps.is_dir():
        pytest.skip("../shared/datasets/rps is not present")
    return rps


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(url: str, server: subprocess.Popen, seconds: float = 120) -> None:
    """Until `url` answers 200 (the server is up), or fail saying so."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert server.poll() is None, "the server exited"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {seconds} s")


def sh(cwd: Path, *args: str, env: dict, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-4000:]}"
    return done


def output(done: subprocess.CompletedProcess) -> str:
    return done.stdout + done.stderr


def nothing_but_the_source_check_ran(printed: str) -> bool:
    """What a no-op `dvc repro` prints: the source stage runs every time (always_changed) and finds the
    dataset's files as they were, so no other stage runs."""
    return printed.count("Running stage") == 1 and "Running stage 'source'" in printed


def tiny_project(tmp_path: Path, **sections: dict) -> tuple[Path, dict]:
    """A git+DVC project in tmp_path/project holding this repo's pipeline on a tiny generated dataset (not yet
    reproduced), and the environment to run dvc in. `sections` update params.yaml's sections past the tiny
    defaults (e.g. baselines={"models": ["random_forest"]}).

    train.device=cpu: the same stages and numbers on every machine (a GPU one included).
    """
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
    params["train"].update(batch_size=8, device="cpu")
    # Each builder has its own unit test: here one of each kind, end to end.
    params["baselines"].update(models=["random_forest", "mlp", "cnn3_small"], epochs=2, pixels_size=12, forest_trees=10)
    params["tune"].update(max_trials=2, epochs=1, image_size=16, final_epochs=1)
    params["transfer"].update(weights="none", image_size=71, epochs=3)
    for section, values in sections.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # dvc.yaml's `python`
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    sh(root, "git", "init", "-q", env=env)
    sh(root, "dvc", "init", "-q", env=env)
    sh(root, "dvc", "config", "core.analytics", "false", env=env)
    return root, env


@pytest.fixture(scope="session")
def e2e_project(tmp_path_factory):
    """A git+DVC project holding this repo's pipeline on a tiny generated dataset, reproduced once with every
    stage's reads traced into <root>/trace (pipeline/trace.py): (root, env, what `dvc repro` printed).

    Shared by the end-to-end tests and the dvc.yaml tracing tests: one repro serves both.
    """
    root, env = tiny_project(tmp_path_factory.mktemp("e2e"))
    first = output(sh(root, "dvc", "repro", env={**env, "PIPELINE_TRACE_DIR": str(root / "trace")}))
    return root, env, first

