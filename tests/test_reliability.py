"""Unlucky runs: a stage killed outright, a full disk, a tracking store that is deleted or unreachable."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import pytest

from pipeline import device, fsio, tracking
from pipeline.errors import UserError

from .conftest import REPO, make_dataset
from .test_preprocess import packed

ENV = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "-1", "TF_CPP_MIN_LOG_LEVEL": "3"}


def killed_child(code: str, ready: Path, cwd: Path) -> None:
    """Run `code` in a fresh interpreter, wait until it creates `ready`, then kill -9 it."""
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=ENV)
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert child.poll() is None, "the child ended before it was killed"
        assert time.monotonic() < deadline, "the child never got ready"
        time.sleep(0.1)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)


def test_temporaries_of_a_killed_writer_are_swept_by_the_next_write(tmp_path):
    target = tmp_path / "data" / "prepared"
    ready = tmp_path / "ready"
    killed_child(
        f"""
        import time
        from pathlib import Path
        from pipeline import fsio
        with fsio.atomic_dir(Path({str(target)!r})) as out:
            (out / "half.rec").write_bytes(b"x" * 1000)
            with fsio.atomic_file(Path({str(target)!r}).parent / "raw.tar") as tar:
                tar.write_bytes(b"y")
                Path({str(ready)!r}).touch()
                time.sleep(600)
        """,
        ready,
        tmp_path,
    )
    left = sorted(p.name for p in target.parent.iterdir())
    assert len(left) == 2 and all(name.endswith(".tmp") for name in left), left  # what kill -9 leaves

    live = target.parent / f".prepared.{os.getpid()}.keepme.tmp"  # a parallel writer that still runs
    live.mkdir()
    with fsio.atomic_dir(target) as out:
        (out / "whole.rec").write_bytes(b"z")
    names = sorted(p.name for p in target.parent.iterdir())
    assert "prepared" in names and live.name in names
    assert not [n for n in names if n.startswith(".prepared.") and n != live.name]  # the killed dir temp is gone
    assert [n for n in names if n.startswith(".raw.tar.")]  # another target's temporary waits for its own stage
    with fsio.atomic_file(target.parent / "raw.tar") as tar:
        tar.write_bytes(b"whole")
    assert sorted(p.name for p in target.parent.iterdir()) == sorted(["prepared", "raw.tar", live.name])


def test_a_run_left_running_by_a_killed_stage_is_marked_killed(workspace, params):
    ready = workspace / "ready"
    killed_child(
        f"""
        import time
        from pathlib import Path
        from pipeline import device, tracking
        from pipeline.params import load_params
        params = load_params({str(REPO / "params.yaml")!r})
        with tracking.stage_run("preprocess", params, device.cpu_only()):
            Path({str(ready)!r}).touch()
            time.sleep(600)
        """,
        ready,
        workspace,
    )
    mlflow.set_tracking_uri(f"sqlite:///{workspace / 'mlruns' / 'mlflow.db'}")
    [killed] = mlflow.search_runs(experiment_names=[params.mlflow.experiment], output_format="list")
    assert killed.info.status == "RUNNING"

    with tracking.stage_run("preprocess", params, device.cpu_only()):
        pass
    runs = {run.info.run_id: run.info.status for run in mlflow.search_runs(
        experiment_names=[params.mlflow.experiment], output_format="list")}
    assert runs.pop(killed.info.run_id) == "KILLED"
    assert list(runs.values()) == ["FINISHED"]


def test_a_deleted_experiment_is_one_clear_line(workspace, params):
    with tracking.stage_run("preprocess", params, device.cpu_only()):
        pass
    client = mlflow.MlflowClient()
    client.delete_experiment(client.get_experiment_by_name(params.mlflow.experiment).experiment_id)
    deleted = r"experiment 'image-pipeline' is deleted: restore it \(mlflow experiments restore"
    with pytest.raises(UserError, match=deleted), tracking.stage_run("preprocess", params, device.cpu_only()):
        pytest.fail("the stage body must not run")


def test_an_unreachable_tracking_server_fails_fast_with_one_line(workspace, params, monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed}")
    unreachable = rf"tracking server http://127.0.0.1:{closed} is unreachable"
    with pytest.raises(UserError, match=unreachable), tracking.stage_run("preprocess", params, device.cpu_only()):
        pytest.fail("the stage body must not run")

    silent = socket.socket()  # accepts connections, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    monkeypatch.setattr(tracking, "SERVER_PROBE_SECONDS", 1)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{silent.getsockname()[1]}")
    start = time.monotonic()
    try:
        with pytest.raises(UserError, match="is unreachable"), tracking.stage_run("preprocess", params, device.cpu_only()):
            pass
    finally:
        silent.close()
    assert time.monotonic() - start < 10


# --------------------------------------------------------------------------------------------
# A full disk: the real preprocess stage writing onto a 2 MB tmpfs
# --------------------------------------------------------------------------------------------


def _tmpfs_runner() -> list[str] | None:
    """A command prefix that runs a shell with a fresh 2 MB tmpfs on ./data, or None where none can be made."""
    as_root = ["sh", "-c"] if os.geteuid() == 0 else ["unshare", "-Urm", "sh", "-c"]
    if shutil.which(as_root[0]) is None:
        return None
    probe = subprocess.run([*as_root, "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && umount $d"],
                           capture_output=True, timeout=30, check=False)
    return as_root if probe.returncode == 0 else None


def test_a_full_disk_is_a_clear_error_the_run_failed_and_nothing_half_written(tmp_path):
    runner = _tmpfs_runner()
    if runner is None:
        pytest.skip("cannot mount a small tmpfs here (needs root or user namespaces)")
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    shutil.copy(REPO / "dvc.yaml", project)
    shutil.copy(REPO / "params.yaml", project)
    tar = packed(make_dataset(tmp_path / "photos", classes=2, shots=12, frames=2), tmp_path)
    # data/ is a 1 MB file system holding links to the tar and its listing: the 48 images at 128 px
    # (2.4 MB) cannot fit while preprocess writes them.
    script = (
        f"mount -t tmpfs -o size=1m tmpfs data && ln -s {tar} data/raw.tar && ln -s {tar.with_suffix('.json')} data/ && "
        f"{sys.executable} -m pipeline.stages.preprocess; code=$?; ls -A data; umount data; exit $code"
    )
    done = subprocess.run([*runner, script], cwd=project, env=ENV, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "error: no space left on the device writing" in done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(done.stdout.split()) == ["raw.json", "raw.tar"]  # no prepared/, no temporary
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    [run] = mlflow.search_runs(experiment_names=["image-pipeline"], output_format="list")
    assert run.info.status == "FAILED" and run.info.run_name.startswith("preprocess · ")


@pytest.mark.parametrize("stage, missing, writer", [("baselines", "data/prepared", "preprocess"), ("preprocess", "data/raw.tar", "download")])
def test_a_stage_run_before_its_inputs_exist_names_them_and_their_stage(tmp_path, stage, missing, writer):
    shutil.copy(REPO / "dvc.yaml", tmp_path)
    shutil.copy(REPO / "params.yaml", tmp_path)
    done = subprocess.run([sys.executable, "-m", f"pipeline.stages.{stage}"], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == f"error: {missing} is missing: run `dvc repro {writer}` first (it writes {missing})"
    assert not (tmp_path / "mlruns").exists()  # refused before any run was opened
