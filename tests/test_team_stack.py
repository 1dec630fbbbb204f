"""The team stack for real (scripts/team-stack): PostgreSQL as MLflow's store, `mlflow server --serve-artifacts`, a DVC
remote; a `dvc exp run` tracked on the server, `dvc push`, a fresh clone's `dvc pull` and no-op `dvc repro`; a
database that is down named in one line; and nothing left running after `stop`."""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import psutil
import pytest

from pipeline import team_stack

from .conftest import (
    REPO,
    free_port,
    nothing_but_the_source_check_ran,
    output,
    sh,
    tiny_project,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        team_stack.postgres_bin() is None, reason="no PostgreSQL binaries here (Debian: apt-get install postgresql)"
    ),
]
STAGES = {"download", "preprocess", "augment", "baselines", "tune", "features", "transfer", "evaluate"}


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def process_group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A tiny project with scripts/team-stack, its stack started (the stack's data outside pytest's private
    temporary tree: as root, PostgreSQL runs as the `postgres` user, who must reach it)."""
    root, env = tiny_project(
        tmp_path_factory.mktemp("team"), baselines={"models": ["random_forest"]},
        tune={"max_trials": 1, "final_epochs": 1}, transfer={"epochs": 1},
    )
    shutil.copytree(REPO / "scripts", root / "scripts")
    sh(root, "git", "add", "-A", env=env)
    sh(root, "git", "commit", "-qm", "baseline", env=env)
    home = Path(tempfile.mkdtemp(prefix="team-stack-"))
    home.chmod(0o755)
    port, pg_port = free_port(), free_port()
    started = output(sh(root, "scripts/team-stack", "start", "--dir", str(home), "--port", str(port),
                        "--pg-port", str(pg_port), env=env, timeout=400))
    try:
        yield root, env, home, port, pg_port, started
    finally:
        sh(root, "scripts/team-stack", "stop", "--dir", str(home), env=env, check=False)
        shutil.rmtree(home, ignore_errors=True)


def test_a_team_records_on_the_server_and_shares_data_through_the_remote(stack, tmp_path):
    root, env, home, port, _, started = stack
    uri = f"http://127.0.0.1:{port}"
    assert f"export MLFLOW_TRACKING_URI={uri}" in started
    again = sh(root, "scripts/team-stack", "start", "--dir", str(home), env=env)  # idempotent: the same processes
    assert team_stack.status(home)["mlflow"]["pid"] == team_stack.read_state(home)["mlflow_pid"]
    assert "running" in again.stdout

    exp = output(sh(root, "dvc", "exp", "run", "-n", "team", env={**env, "MLFLOW_TRACKING_URI": uri}))
    assert f"in {uri}" in exp
    assert not (root / "mlruns").exists()  # nothing recorded beside the project
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["image-pipeline"], output_format="list")
    tops = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert {r.data.tags["stage"] for r in tops} == STAGES
    assert {r.data.tags["dvc.exp_name"] for r in runs} == {"team"}
    assert all(r.info.status == "FINISHED" for r in runs)
    # Artifacts go through the server (--serve-artifacts) into its artifacts directory, not the client's disk.
    assert all(r.info.artifact_uri.startswith("mlflow-artifacts:/") for r in runs)
    assert any((home / "artifacts").rglob("confusion.png"))
    champion = mlflow.MlflowClient().get_model_version_by_alias("image-classifier-tiny", "champion")
    assert champion.tags["dataset"] == "tiny"  # the registry lives in PostgreSQL too

    sh(root, "git", "add", "-A", env=env)
    sh(root, "git", "commit", "-qm", "experiment team", env=env)
    pushed = output(sh(root, "dvc", "push", env=env))
    assert "files pushed" in pushed and any((home / "dvc-remote").iterdir())

    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(root), str(clone), env=env)
    sh(clone, "dvc", "remote", "add", "--local", "--default", "team", str(home / "dvc-remote"), env=env)
    sh(clone, "dvc", "pull", env=env)
    for model in ("champion.keras", "tuned", "transfer", "baselines"):
        assert (clone / "data" / "models" / model).exists(), model
    repro = output(sh(clone, "dvc", "repro", env=env))
    assert nothing_but_the_source_check_ran(repro)
    champion_file = Path("data", "models", "champion.keras")
    assert (clone / champion_file).read_bytes() == (root / champion_file).read_bytes()


def test_a_database_that_is_down_is_one_line_naming_the_store(stack):
    root, env, home, port, pg_port, _ = stack
    cluster = team_stack.postmaster(home)
    assert cluster is not None
    # PostgreSQL alone, as the stack runs pg_ctl (as `postgres` when we are root): the server keeps running.
    pg_ctl = [str(team_stack.postgres_bin() / "pg_ctl"), "-D", str(home / "postgres"), "-m", "fast", "-w", "stop"]
    sh(root, *team_stack._as_owner(pg_ctl), env=env)
    stage = [sys.executable, "-m", "pipeline.stages.preprocess"]
    direct = f"postgresql://mlflow:not-the-password@127.0.0.1:{pg_port}/mlflow"
    named = {f"http://127.0.0.1:{port}": f"http://127.0.0.1:{port}", direct: direct.replace("not-the-password", "***")}
    for uri, shown in named.items():
        start = time.monotonic()
        refused = sh(root, *stage, env={**env, "MLFLOW_TRACKING_URI": uri}, check=False, timeout=120)
        assert refused.returncode == 2, output(refused)
        [line] = refused.stderr.strip().splitlines()[-1:]
        assert line.startswith("error: ") and f"{shown} " in line and "Traceback" not in refused.stderr, refused.stderr
        assert "not-the-password" not in refused.stderr
        assert time.monotonic() - start < 60
    # start brings the database back under the running server.
    sh(root, "scripts/team-stack", "start", "--dir", str(home), env=env)
    assert team_stack.status(home)["postgres"] is not None


def test_stop_leaves_nothing_running(stack):
    root, env, home, port, pg_port, _ = stack
    report = team_stack.status(home)
    pids = [report["postgres"]["pid"], report["mlflow"]["pid"]]
    group = [pid for pid in psutil.pids() if process_group(pid) == pids[1]]
    assert len(group) > 1  # the server and its uvicorn workers
    stopped = sh(root, "scripts/team-stack", "stop", "--dir", str(home), env=env).stdout
    assert "stopped mlflow server" in stopped and "stopped PostgreSQL" in stopped
    deadline = time.monotonic() + 10  # a process that has just exited may wait a moment to be reaped
    while any(running(pid) for pid in pids + group) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(running(pid) for pid in pids + group)
    for free in (port, pg_port):
        team_stack._check_port_free(free, "test", "-")
    status = sh(root, "scripts/team-stack", "status", "--dir", str(home), env=env, check=False)
    assert status.returncode == 3 and "postgres: stopped" in status.stdout and "mlflow server: stopped" in status.stdout


def test_a_port_in_use_is_one_line_naming_it_before_anything_is_made(tmp_path):
    home = Path(tempfile.mkdtemp(prefix="team-stack-"))
    home.chmod(0o755)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        refused = subprocess.run(
            [sys.executable, "-m", "pipeline.team_stack", "start", "--dir", str(home), "--pg-port", str(port)],
            cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )
        made = list(home.iterdir())
    finally:
        taken.close()
        shutil.rmtree(home, ignore_errors=True)
    assert refused.returncode == 2 and made == []
    assert refused.stderr.strip() == (
        f"error: port {port} on 127.0.0.1 is in use: PostgreSQL cannot listen there (choose another with --pg-port)"
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="as an ordinary user PostgreSQL runs as that user: nothing to reach")
def test_as_root_a_stack_directory_postgres_cannot_reach_is_one_line(tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    refused = subprocess.run(
        [sys.executable, "-m", "pipeline.team_stack", "start", "--dir", str(private / "stack"),
         "--port", str(free_port()), "--pg-port", str(free_port())],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        f"error: user 'postgres' (PostgreSQL does not run as root) cannot reach {private / 'stack' / 'postgres.partial'}: "
        "put the stack in a directory every user may traverse (--dir)"
    )
