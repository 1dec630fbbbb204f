"""Where the random forest's memory goes (issue 27): the peak RSS of each phase of its life in the baselines
and evaluate stages, grown to purity and with bounds on its leaves, on a project bench/memory_scaling.py left.

    python -m bench.forest_phases [--project /tmp/bench-memory-scaling/project-8000] [--leaves 0 1024]

The project holds data/prepared and data/augmented of N generated photos at 224 px (memory_scaling's recipe).
Each --leaves value (0: unbounded) runs in two fresh child processes, in the project, as the stages would:
  baselines: the train pixel matrix (training.training_set: train plus the augmented copies, as the stage
    trains on; TensorFlow is imported, as the stage imports it), the fit, val scoring, the .skops dump and
    the ONNX conversion (classic.save and classic.export_onnx: what saved.save_classic calls);
  evaluate: loading the ONNX export (classic.load_for_inference) and predicting the test split's pixels.
A thread samples the process's RSS every 20 ms; each phase reports its peak, and what it adds over the
RSS at its start. The process's own peak (ru_maxrss) is recorded beside them.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from bench.common import ROOT, venv_env, write_result


def gb(count: float) -> float:
    return round(count / 1e9, 3)


class Phases:
    """Peak RSS per named phase, sampled by a background thread (sklearn's fit and onnxruntime release the
    GIL; the ONNX conversion is Python, which yields it every few ms)."""

    def __init__(self) -> None:
        import psutil

        self.process = psutil.Process()
        self.rows: dict[str, dict[str, float]] = {}
        self.peak = 0
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.02)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start_rss = self.peak = self.process.memory_info().rss
        start = time.perf_counter()
        yield
        peak = max(self.peak, self.process.memory_info().rss)
        self.rows[name] = {
            "rss_at_start_gb": gb(start_rss), "peak_rss_gb": gb(peak), "added_gb": gb(peak - start_rss),
            "seconds": round(time.perf_counter() - start, 2),
        }

    def result(self) -> dict[str, Any]:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        return {"phases": self.rows, "process_peak_rss_gb": gb(peak)}


def baselines_child(leaves: int | None, models: Path) -> dict[str, Any]:
    from pipeline import imageset, paths, training
    from pipeline.models import classic
    from pipeline.params import load_params

    params = load_params("params.yaml")
    size = params.baselines.pixels_size
    phases = Phases()
    train = training.training_set(params)
    with phases.phase("pixel_matrix"):
        x = classic.split_pixels(train, size)
    forest = classic.estimator("random_forest", params.seed, params.baselines.forest_trees, leaves)
    with phases.phase("fit"):
        forest.fit(x, train.labels)
    del x
    with phases.phase("val_scoring"):
        forest.predict_proba(classic.split_pixels(imageset.load_split(paths.PREPARED, "val"), size))
    skops = models / "random_forest.skops"
    with phases.phase("skops_dump"):
        classic.save(forest, skops)
    with phases.phase("onnx_export"):
        classic.export_onnx(forest, skops.with_suffix(".onnx"))
    return {
        "train_images": train.count,
        "nodes": int(sum(tree.tree_.node_count for tree in forest.estimators_)),
        "max_leaves_grown": int(max(tree.get_n_leaves() for tree in forest.estimators_)),
        "skops_bytes": skops.stat().st_size, "onnx_bytes": skops.with_suffix(".onnx").stat().st_size,
        **phases.result(),
    }


def evaluate_child(models: Path) -> dict[str, Any]:
    from pipeline import imageset, paths
    from pipeline.models import classic
    from pipeline.params import load_params

    size = load_params("params.yaml").baselines.pixels_size
    phases = Phases()
    with phases.phase("evaluate_load_onnx"):
        model = classic.load_for_inference(models / "random_forest.skops")
    with phases.phase("evaluate_predict_test"):
        model.predict_proba(classic.split_pixels(imageset.load_split(paths.PREPARED, "test"), size))
    return phases.result()


def run_child(project: Path, *args: str) -> dict[str, Any]:
    """This module in a fresh process working in `project` (its data and params.yaml), importing this repo's
    code: -P keeps the project's own copy of the code (memory_scaling's snapshot) off sys.path."""
    env = venv_env()
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-P", "-m", "bench.forest_phases", "--child", *args], cwd=project,
                          env=env, stdout=subprocess.PIPE, check=True, text=True)
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, default=Path("/tmp/bench-memory-scaling/project-8000"))
    parser.add_argument("--leaves", nargs="+", type=int, default=[0, 1024], help="0: grown to purity")
    parser.add_argument("--child", choices=["baselines", "evaluate"], help=argparse.SUPPRESS)
    parser.add_argument("--models", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        leaves = args.leaves[0] or None
        found = baselines_child(leaves, args.models) if args.child == "baselines" else evaluate_child(args.models)
        print(json.dumps(found))
        return

    project = args.project.resolve()
    baselines = yaml.safe_load((project / "params.yaml").read_text())["baselines"]
    by_leaves: dict[str, Any] = {}
    for leaves in args.leaves:
        with tempfile.TemporaryDirectory() as models:
            stage = run_child(project, "baselines", "--leaves", str(leaves), "--models", models)
            evaluate = run_child(project, "evaluate", "--models", models)
        key = str(leaves) if leaves else "unbounded"
        by_leaves[key] = {"baselines": stage, "evaluate": evaluate}
        print(f"leaves {key}: {json.dumps(by_leaves[key])}", file=sys.stderr, flush=True)
    write_result("forest_phases", {
        "setup": {
            "project": str(project), "leaves": args.leaves,
            "params": {f"baselines.{key}": baselines[key] for key in ("forest_trees", "pixels_size")},
            "sampling": "RSS every 20 ms in a thread; added_gb = phase peak - RSS at the phase's start",
        },
        "by_leaves": by_leaves,
    })


if __name__ == "__main__":
    main()
