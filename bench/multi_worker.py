"""train.strategy=multi_worker over two processes on this machine vs one process (train.strategy=none).

cnn3_small (`pipeline.models.cnn.build`) on an rps sample split by shot (`common.rps_sample`: --train /
--val images at --size px), `training.fit` for --epochs with the params' train settings (early stopping
off, so both arms run every epoch), learning rate `baselines.learning_rate`. Each arm is fresh processes
(`python -m bench.multi_worker --child STRATEGY OUT`): one process, then two with a TF_CONFIG cluster on
127.0.0.1 (global batch 2 x train.batch_size, learning rate x sqrt(2): pipeline/training.py). Reported:
wall time of each arm (process start to exit: TensorFlow start-up and the cluster's handshake included),
the fit's own seconds, and the val accuracy of the last and the best epoch.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common


def child(strategy: str, data: Path, out: Path, epochs: int) -> None:
    from pipeline import device

    info = device.configure("cpu", deterministic=True, strategy=strategy)
    import keras

    from pipeline import imageset, training
    from pipeline.models import cnn

    params = common.params()
    settings = params.train.model_copy(update={"early_stopping_patience": 0, "reduce_lr_patience": 0})
    train, val = imageset.load_split(data, "train"), imageset.load_split(data, "val")
    keras.utils.set_random_seed(params.seed)
    model = cnn.build("cnn3_small", train.shape[0], params.baselines.pixels_size, 3)
    training.compile_classifier(model, params.baselines.learning_rate, settings)

    class Epochs:  # training.fit's MLflow handle; the returned rows are what is reported
        def log_now(self, metrics: dict, step: int | None = None) -> None:
            pass

    result = training.fit(model, train, val, settings=settings, epochs=epochs, run=Epochs(), seed=params.seed)
    out.write_text(json.dumps({"tags": info.tags(), "rows": result.rows, "fit_seconds": result.seconds}))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def arm(processes: int, data: Path, scratch: Path, epochs: int) -> dict:
    strategy = "multi_worker" if processes > 1 else "none"
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(processes)]
    start = time.perf_counter()
    running = []
    for index in range(processes):
        env = common.venv_env()
        if processes > 1:
            env["TF_CONFIG"] = json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}})
        out = scratch / f"{strategy}-{index}.json"
        command = [sys.executable, "-m", "bench.multi_worker", "--child", strategy, "--data", str(data),
                   "--out", str(out), "--epochs", str(epochs)]
        running.append((out, subprocess.Popen(command, cwd=common.ROOT, env=env, stdout=sys.stderr)))
    for _, process in running:
        if process.wait() != 0:
            raise SystemExit(f"a {strategy} process failed (exit {process.returncode})")
    wall = time.perf_counter() - start
    first = json.loads(running[0][0].read_text())
    val = [row["val_accuracy"] for row in first["rows"]]
    return {
        "processes": processes,
        "strategy": strategy,
        "replicas": first["tags"]["device.replicas"].split(","),
        "wall_seconds": round(wall, 2),
        "fit_seconds": round(first["fit_seconds"], 2),
        "seconds_per_epoch": [row["seconds"] for row in first["rows"]],
        "val_accuracy_last": round(val[-1], 4),
        "val_accuracy_best": round(max(val), 4),
        "val_accuracy_by_epoch": [round(v, 4) for v in val],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--val", type=int, default=150)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--child", choices=["none", "multi_worker"], help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.data, args.out, args.epochs)
        return
    params = common.params()
    settings = params.preprocess.model_copy(update={"image_size": args.size})
    with tempfile.TemporaryDirectory(prefix="bench-multi-worker-") as scratch:
        scratch = Path(scratch)
        (scratch / "data").mkdir()
        common.rps_sample(common.RPS, settings, {"train": args.train, "val": args.val}, params.seed, scratch / "data")
        one = arm(1, scratch / "data", scratch, args.epochs)
        two = arm(2, scratch / "data", scratch, args.epochs)
    common.write_result("multi_worker", {
        "setup": {"model": "cnn3_small", "train_images": args.train, "val_images": args.val, "image_size": args.size,
                  "epochs": args.epochs, "batch_size_per_replica": params.train.batch_size,
                  "learning_rate": params.baselines.learning_rate, "cpu_cores": os.cpu_count()},
        "one_process": one,
        "two_processes": two,
        "wall_ratio_two_vs_one": round(two["wall_seconds"] / one["wall_seconds"], 3),
        "val_accuracy_difference_last": round(two["val_accuracy_last"] - one["val_accuracy_last"], 4),
    })


if __name__ == "__main__":
    main()
