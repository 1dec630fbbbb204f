"""Scale-out with the engines the stack has: Keras Tuner's chief/worker search, tf.distribute strategies.

Real processes throughout: the tune stage serving its oracle to two worker processes (one of them killed
mid-trial), two MultiWorkerMirroredStrategy processes on 127.0.0.1, MirroredStrategy over two logical CPUs.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import mlflow
import numpy as np
import pytest
import yaml

from pipeline import device, fsio
from pipeline.errors import UserError
from pipeline.stages import tune

from .conftest import REPO, split_on_disk

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def python(*args, cwd=REPO, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], check=False, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def search_project(tmp_path, monkeypatch):
    """A project holding a tiny prepared set (3 classes of 20 px noise) and params for a 3-trial search
    by 2 workers: what the tune stage reads, nothing else."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"] |= {"batch_size": 8, "early_stopping_patience": 0, "reduce_lr_patience": 0, "use_augmented": False}
    raw["tune"] |= {"max_trials": 3, "epochs": 1, "subset": 1.0, "image_size": 16, "final_epochs": 1, "workers": 2}
    raw["tune"]["space"] |= {"filters": [4, 8], "dense_units": [8, 16]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    prepared = tmp_path / "data" / "prepared"
    rng = np.random.default_rng(0)
    for split, count in (("train", 36), ("val", 12)):
        split_on_disk(prepared, rng.integers(0, 256, (count, 20, 20, 3), dtype=np.uint8), np.arange(count) % 3, split)
    fsio.write_json(prepared / "classes.json", ["a", "b", "c"])
    fsio.write_json(prepared / "manifest.json", {"generated": "tests/test_distributed.py"})
    (tmp_path / "data" / "augmented").mkdir()
    return tmp_path


def runs_of(project, experiment="image-pipeline"):
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


def test_two_workers_search_and_a_worker_killed_mid_trial_gives_its_trial_back(search_project):
    stage = subprocess.Popen(
        [sys.executable, "-m", "pipeline.stages.tune"], cwd=search_project, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(stage.stderr), daemon=True)
    reader.start()
    victim = f"{socket.gethostname()}-w1"
    killed = None
    deadline = time.monotonic() + 240
    while killed is None and stage.poll() is None and time.monotonic() < deadline:
        if any("[tune] MLflow run" in line for line in lines):  # the store exists: read it without racing its creation
            for run in runs_of(search_project):
                tags = run.data.tags
                if tags.get("tune.worker") == victim and "trial" in tags and run.info.status == "RUNNING":
                    os.kill(int(tags["process.pid"]), signal.SIGKILL)  # as an OOM kill or a lost machine
                    killed = tags["trial"]
                    break
        time.sleep(0.2)
    stage.wait(timeout=240)
    reader.join()
    stderr = "".join(lines)
    assert killed is not None, f"worker {victim} never held a trial\n{stderr[-3000:]}"
    assert stage.returncode == 0, stderr[-3000:]
    assert f"tune worker {victim} exited with code -9 during {killed.replace('_', ' ')}: another worker retries it" in stderr

    trials = [r for r in runs_of(search_project) if "trial" in r.data.tags]
    assert sorted((r.data.tags["trial"], r.info.status) for r in trials if r.info.status != "FINISHED") == [
        (killed, "KILLED")
    ]
    finished = {r.data.tags["trial"]: r for r in trials if r.info.status == "FINISHED"}
    assert sorted(finished) == ["trial_0", "trial_1", "trial_2"]  # the killed trial ran again
    assert finished[killed].data.tags["tune.worker"] != victim
    assert all(0 <= r.data.metrics["val_accuracy"] <= 1 and r.data.metrics["epochs"] == 1 for r in finished.values())
    stage_run = next(r for r in runs_of(search_project) if r.data.tags.get("stage") == "tune" and "trial" not in r.data.tags
                     and "model" not in r.data.tags)
    assert all(r.data.tags["mlflow.parentRunId"] == stage_run.info.run_id for r in trials)
    assert {r.data.tags["tune.worker"] for r in finished.values()} <= {f"{socket.gethostname()}-w0", victim}
    search = json.loads((search_project / "metrics" / "tune.json").read_text())["search"]
    assert search["trials"] == 3 and search["workers"] == 2 and search["worker_failures"] == 1
    assert search["trials_run_now"] == 3 and search["best_val_accuracy"] > 0
    assert (search_project / "data" / "models" / "tuned" / "tuned_cnn3v2.keras").is_file()


def test_oracle_port_in_use_is_an_error_naming_the_port():
    import keras_tuner as kt

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"port {port} is in use"):
            tune.serve_oracle(kt.oracles.RandomSearchOracle(objective="val_accuracy", max_trials=1), f"127.0.0.1:{port}")


def test_worker_without_a_reachable_oracle_gives_up_with_a_message(search_project):
    port = free_port()
    start = time.monotonic()
    done = python("-m", "pipeline.stages.tune", "--worker", "lonely", "--oracle", f"127.0.0.1:{port}",
                  "--connect-timeout", "2", cwd=search_project, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"error: no tuner oracle answered at 127.0.0.1:{port} within 2 s" in done.stderr
    assert "Traceback" not in done.stderr and time.monotonic() - start < 120


def fit_processes(out_dir, runs: list[tuple[str, int]]) -> dict[str, list[dict]]:
    """Processes of tests/fit_worker.py, all at once: (strategy, count) each; the `count` processes of one
    strategy form a TF_CONFIG cluster on 127.0.0.1 when there are several. Their results, by strategy."""
    started = []
    for strategy, count in runs:
        addresses = [f"127.0.0.1:{free_port()}" for _ in range(count)]
        for index in range(count):
            cluster = {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
            env = {**os.environ, "TF_CONFIG": json.dumps(cluster)} if count > 1 else None
            out = out_dir / f"{strategy}-{index}.json"
            started.append((strategy, out, subprocess.Popen(
                [sys.executable, "-m", "tests.fit_worker", strategy, str(out)],
                cwd=REPO, env=env, stderr=subprocess.PIPE, text=True,
            )))
    results: dict[str, list[dict]] = {}
    for strategy, out, process in started:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
        results.setdefault(strategy, []).append(json.loads(out.read_text()))
    return results


def test_two_process_multi_worker_and_two_device_mirrored_fits_match_one_process(tmp_path):
    results = fit_processes(tmp_path, [("none", 1), ("mirrored", 1), ("multi_worker", 2)])
    (one,), (mirrored,), (first, second) = results["none"], results["mirrored"], results["multi_worker"]
    replicas = "/job:worker/replica:0/task:0/device:CPU:0,/job:worker/replica:0/task:1/device:CPU:0"
    for worker, tags in enumerate((first["tags"], second["tags"])):
        assert tags["device.strategy"] == "multi_worker" and tags["device.replicas"] == replicas
        assert tags["device.replica_count"] == "2" and tags["device.task"] == f"worker:{worker}"
    assert mirrored["tags"]["device.strategy"] == "mirrored" and mirrored["tags"]["device.replicas"].split(",") == [
        "/job:localhost/replica:0/task:0/device:CPU:0", "/job:localhost/replica:0/task:0/device:CPU:1"
    ]
    assert one["tags"]["device.replica_count"] == "1" and one["global_batch"] == 16
    assert first["global_batch"] == mirrored["global_batch"] == 32  # train.batch_size is per replica
    # One model in sync across the two processes, and the same computation as two devices in one process.
    losses = {name: [row["val_loss"] for row in run["rows"]] for name, run in
              (("first", first), ("second", second), ("mirrored", mirrored))}
    assert losses["first"] == losses["second"]
    assert losses["first"] == pytest.approx(losses["mirrored"], rel=1e-4)
    assert first["predictions"] == 128 and first["predicted_val_accuracy"] == first["rows"][-1]["val_accuracy"]
    # The same accuracy as one process within noise (128 val images: one image is 0.8 points).
    assert one["rows"][-1]["val_accuracy"] > 0.85
    assert abs(first["rows"][-1]["val_accuracy"] - one["rows"][-1]["val_accuracy"]) <= 0.08


def test_mirrored_with_one_device_and_multi_worker_without_tf_config_are_clear_errors(monkeypatch):
    with pytest.raises(device.DeviceError, match=r"'mirrored' but TensorFlow sees one device \(.*CPU:0\)"):
        device.distribution("mirrored", gpus=0)
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(device.DeviceError, match="'multi_worker' but TF_CONFIG is not set"):
        device.distribution("multi_worker", gpus=0)
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 3}}')
    with pytest.raises(device.DeviceError, match="TF_CONFIG must name a cluster and this process's task"):
        device.distribution("multi_worker", gpus=0)
    assert device.distribution("auto", gpus=1) is None and device.distribution("none", gpus=4) is None
