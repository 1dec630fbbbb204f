"""Parallel experiments: two `dvc exp run --queue` run at once by `dvc queue start -j 2`, every stage of each recorded
in the project's one sqlite MLflow store under its own dvc.exp_name, none failing with "database is locked"."""
import time

import mlflow
import pytest

from .conftest import output, sh, tiny_project

pytestmark = pytest.mark.integration
EXPERIMENTS = {"copies-1": 1, "copies-3": 3}


@pytest.fixture(scope="module")
def queued(tmp_path_factory):
    """A tiny project reproduced up to baselines, then two queued experiments (each re-runs augment and baselines
    in its own temporary copy) run by two workers."""
    root, env = tiny_project(tmp_path_factory.mktemp("queue"), baselines={"models": ["random_forest"]})
    sh(root, "dvc", "repro", "baselines", env=env)
    sh(root, "git", "add", "-A", env=env)
    sh(root, "git", "commit", "-qm", "baseline", env=env)
    for name, copies in EXPERIMENTS.items():
        sh(root, "dvc", "exp", "run", "--queue", "-n", name, "-S", f"augment.copies={copies}", "baselines", env=env)
    sh(root, "dvc", "queue", "start", "-j", "2", env=env)
    deadline = time.monotonic() + 600
    while any(word in (status := output(sh(root, "dvc", "queue", "status", env=env))) for word in ("Queued", "Running")):
        assert time.monotonic() < deadline, f"the queue did not finish in 10 min:\n{status}"
        time.sleep(3)
    logs = {name: output(sh(root, "dvc", "queue", "logs", name, env=env, check=False)) for name in EXPERIMENTS}
    return root, env, status, logs


def test_two_queued_experiments_run_at_once_and_both_are_tracked(queued):
    root, env, status, logs = queued
    for name in EXPERIMENTS:
        [line] = [line for line in status.splitlines() if f" {name} " in line]
        assert line.split()[-1] == "Success", status
        assert "database is locked" not in logs[name]
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["image-pipeline"], output_format="list")
    spans = {}
    for name, copies in EXPERIMENTS.items():
        ours = [r for r in runs if r.data.tags["dvc.exp_name"] == name]
        stages = {r.data.tags["stage"] for r in ours}
        assert stages == {"augment", "baselines"} and all(r.info.status == "FINISHED" for r in ours), name
        [augment] = [r for r in ours if r.data.tags["stage"] == "augment"]
        assert augment.data.params["augment.copies"] == str(copies)
        spans[name] = (min(r.info.start_time for r in ours), max(r.info.end_time for r in ours))
    # At once: each experiment started before the other ended.
    (start_a, end_a), (start_b, end_b) = spans.values()
    assert start_a < end_b and start_b < end_a, spans
    shown = output(sh(root, "dvc", "exp", "show", "--no-pager", "--md", env=env))
    assert all(name in shown for name in EXPERIMENTS)
