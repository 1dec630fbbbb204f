"""The tune stage with tune.workers=2 (Keras Tuner's chief/worker mode, two worker processes here) vs
tune.workers=0 (the search in the stage's process): the same trials, wall time, and the model for N machines.

Each arm runs `python -m pipeline.stages.tune` in its own scratch project holding an rps sample split by
shot (`common.rps_sample`: --train / --val images at 128 px) as data/prepared, params.yaml's search with
--trials random-search trials of --epochs epochs at tune.image_size, on all of the sample
(tune.subset=1), the best retrained for 1 epoch; MLflow into the project's own sqlite store. Both arms draw
the same hyperparameters per trial id; `same_trials_and_scores` also asks for equal scores, which holds only
for a trial that is its process's first (the training stream's shuffle order continues across a process's
trials; the weights start from the same seeds). Reported: the stage's wall time (process start to exit),
metrics/tune.json's search seconds, and per-trial seconds from the trials' MLflow runs.
"""
from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench import common
from pipeline import fsio


def project(root: Path, sample: Path, classes: list[str], workers: int, args: argparse.Namespace) -> Path:
    raw = yaml.safe_load((common.ROOT / "params.yaml").read_text())
    raw["train"] |= {"use_augmented": False}
    raw["tune"] |= {"max_trials": args.trials, "epochs": args.epochs, "subset": 1.0, "final_epochs": 1, "workers": workers}
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    (root / "dvc.yaml").write_text((common.ROOT / "dvc.yaml").read_text())
    (root / "data").mkdir()
    (root / "data" / "augmented").mkdir()
    (root / "data" / "prepared").symlink_to(sample)
    return root


def trial_runs(root: Path) -> list[dict]:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["image-pipeline"], output_format="list")
    return sorted(
        ({"trial": r.data.tags["trial"], "worker": r.data.tags.get("tune.worker", "in-process"),
          "seconds": round((r.info.end_time - r.info.start_time) / 1000, 2),
          "val_accuracy": r.data.metrics.get("val_accuracy"),
          "hyperparameters": {k: r.data.params[k] for k in sorted(r.data.params)}}
         for r in runs if "trial" in r.data.tags and r.info.status == "FINISHED"),
        key=lambda t: t["trial"],
    )


def arm(root: Path) -> dict:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipeline.stages.tune"], check=False, cwd=root, env={
        **common.venv_env(), "PYTHONPATH": str(common.ROOT)}, stdout=sys.stderr)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"the tune stage failed in {root} (exit {done.returncode})")
    search = fsio.read_json(root / "metrics" / "tune.json")["search"]
    return {"wall_seconds": round(wall, 2), "search_seconds": search["seconds"], "trials": trial_runs(root),
            "best_val_accuracy": search["best_val_accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=300)
    parser.add_argument("--val", type=int, default=100)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    params = common.params()
    with tempfile.TemporaryDirectory(prefix="bench-distributed-tune-") as scratch:
        scratch = Path(scratch)
        sample = scratch / "prepared"
        sample.mkdir()
        classes, _ = common.rps_sample(common.RPS, params.preprocess, {"train": args.train, "val": args.val},
                                       params.seed, sample)
        fsio.write_json(sample / "classes.json", classes)
        fsio.write_json(sample / "manifest.json", {"bench": "distributed_tune", "train": args.train, "val": args.val})
        alone = arm(project(scratch / "workers0", sample, classes, 0, args))
        two = arm(project(scratch / "workers2", sample, classes, 2, args))
    same = [(t["hyperparameters"], t["val_accuracy"]) for t in alone["trials"]] == [
        (t["hyperparameters"], t["val_accuracy"]) for t in two["trials"]]
    trial_seconds = sum(t["seconds"] for t in alone["trials"]) / len(alone["trials"])
    fixed = alone["wall_seconds"] - alone["search_seconds"]  # start-up, data, retraining: the same with workers
    worker_start = two["search_seconds"] - math.ceil(args.trials / 2) * trial_seconds
    common.write_result("distributed_tune", {
        "setup": {"train_images": args.train, "val_images": args.val, "trials": args.trials, "epochs": args.epochs,
                  "tune_image_size": params.tune.image_size, "algorithm": "random"},
        "workers_0": alone,
        "workers_2": two,
        "same_trials_and_scores": same,
        "wall_ratio_2_workers_vs_1_process": round(two["wall_seconds"] / alone["wall_seconds"], 3),
        "search_ratio_2_workers_vs_1_process": round(two["search_seconds"] / alone["search_seconds"], 3),
        "model": {
            "formula": "T(N) = fixed + worker_start + ceil(trials / N) * trial_seconds (trials independent; one "
                       "worker per machine with the data pulled; the oracle's calls are milliseconds)",
            "fixed_seconds": round(fixed, 2),
            "trial_seconds_in_process": round(trial_seconds, 2),
            "worker_start_seconds_measured": round(worker_start, 2),
            "projection_seconds": {n: round(fixed + max(worker_start, 0) + math.ceil(args.trials / n) * trial_seconds, 1)
                                   for n in (1, 2, 4, 8)},
        },
    })


if __name__ == "__main__":
    main()
