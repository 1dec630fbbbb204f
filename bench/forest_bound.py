"""What bounding the random forest's leaves costs (issue 27): validation accuracy and model size per
`baselines.forest_max_leaf_nodes`, on rps, cats_vs_dogs and a subset of CIFAR-10, for each seed.

    python -m bench.forest_bound [--datasets rps cats_vs_dogs cifar10] [--seeds 42 1 2]
                                 [--leaves 128 256 512 1024 2048 0]

Each dataset is packed as the download stage packs it (its params.yaml entry, mirrors first) and split by
preprocess's own `prepare` with each seed (same groups, fractions, assignment; image_size from params.yaml,
CIFAR-10 at its native 32 px so 50,000 images stay small). The forest (the stage's own estimator, params.yaml's
trees) is fitted on classic.split_pixels of the prepared train split, without the augment stage's copies,
and scored on val; the test split is never read. CIFAR-10 uses the first --cifar-train / --cifar-val rows of
its splits (preprocess writes them in a seeded random order, so these are random subsets).

Sizes (nodes, .skops and .onnx bytes, written by the pipeline's own classic.save/export_onnx) are taken for
the first seed. The reference is a bound that never binds (as many leaves as training images; see
configurations()). Resumable: each fit's row is kept in <scratch>/rows.json and not fitted again. params.yaml is
read once, at the start. The bound chosen is the smallest whose mean val accuracy over the seeds is within
--tolerance of the reference's on every dataset.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import ROOT, params, timed, write_result
from pipeline import fsio, imageset
from pipeline.models import classic
from pipeline.params import Params, PreprocessParams
from pipeline.stages.download import materialise
from pipeline.stages.preprocess import prepare

NATIVE_SIZE = {"cifar10": 32}


def raw(settings: Params, dataset: str, scratch: Path) -> Path:
    """<scratch>/<dataset>/raw.tar and its listing, as the download stage writes data/raw.tar (once)."""
    tar = scratch / dataset / "raw.tar"
    if not tar.is_file():
        tar.parent.mkdir(parents=True, exist_ok=True)
        spec = settings.data.datasets[dataset]
        listing = materialise(spec, tar, scratch / "downloads", ROOT, settings.download)
        fsio.write_json(tar.with_suffix(".json"), {"group_pattern": spec.group_pattern, **listing})
    return tar


def prepared(settings: Params, dataset: str, seed: int, scratch: Path) -> Path:
    """The dataset split by preprocess's prepare() with `seed`, in <scratch>/<dataset>/prepared-<seed> (once)."""
    out = scratch / dataset / f"prepared-{seed}"
    if not out.is_dir():
        base = settings.preprocess
        size = NATIVE_SIZE.get(dataset, base.image_size)
        split_settings = PreprocessParams(**{**base.model_dump(), "image_size": size})
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        prepare(raw(settings, dataset, scratch), partial, split_settings, seed)
        partial.rename(out)
    return out


def matrices(folder: Path, size: int, limits: dict[str, int | None]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(pixels, labels) of the train and val splits, each cut to its first `limits[split]` rows."""
    found = {}
    for name in ("train", "val"):
        split = imageset.load_split(folder, name)
        keep = limits[name] or split.count
        found[name] = classic.split_pixels(split, size)[:keep], split.labels[:keep]
    return found


def sizes(forest: Any) -> dict[str, int]:
    """Nodes and the bytes of the two files the stage writes for the forest."""
    with tempfile.TemporaryDirectory() as scratch:
        skops, onnx = Path(scratch) / "forest.skops", Path(scratch) / "forest.onnx"
        classic.save(forest, skops)
        classic.export_onnx(forest, onnx)
        return {
            "nodes": int(sum(tree.tree_.node_count for tree in forest.estimators_)),
            "skops_bytes": skops.stat().st_size,
            "onnx_bytes": onnx.stat().st_size,
        }


def fit_one(
    data: dict[str, tuple[np.ndarray, np.ndarray]], seed: int, trees: int, leaves: int | None, measure: bool
) -> dict[str, Any]:
    forest = classic.estimator("random_forest", seed, trees, leaves)
    (x, y), (x_val, y_val) = data["train"], data["val"]
    _, seconds = timed(forest.fit, x, y)
    row: dict[str, Any] = {
        "val_accuracy": round(float(np.mean(forest.predict(x_val) == y_val)), 4),
        "fit_seconds": round(seconds, 2),
        "max_leaves_grown": int(max(tree.get_n_leaves() for tree in forest.estimators_)),
    }
    return row | (sizes(forest) if measure else {})


def summary(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    accuracies = [run["val_accuracy"] for run in runs.values()]
    return {"mean_val_accuracy": round(statistics.mean(accuracies), 4),
            "stdev_val_accuracy": round(statistics.stdev(accuracies), 4) if len(accuracies) > 1 else 0.0}


def configurations(leaves: list[int], train_images: int) -> dict[str, int | None]:
    """max_leaf_nodes per result key. The reference, "n_train": as many leaves as training images never binds,
    and grows the trees best-first as every bound does; grown to purity without the param (sklearn's
    depth-first builder) draws the random features in another order, which alone moves val accuracy by a
    seed's worth. "purity" (0 in --leaves) is that forest: the default before the bound."""
    found: dict[str, int | None] = {"n_train": train_images, **{str(n): n for n in leaves if n}}
    return found | ({"purity": None} if 0 in leaves else {})


def choose(results: dict[str, dict[str, Any]], tolerance: float) -> int | None:
    """The smallest bound within `tolerance` of the reference's mean val accuracy (n_train) on every dataset."""
    bounds = sorted(int(k) for k in next(iter(results.values()))["by_leaves"] if k.isdigit())
    for bound in bounds:
        if all(
            entry["by_leaves"][str(bound)]["mean_val_accuracy"]
            >= entry["by_leaves"]["n_train"]["mean_val_accuracy"] - tolerance
            for entry in results.values()
        ):
            return bound
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["rps", "cats_vs_dogs", "cifar10"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 1, 2])
    parser.add_argument("--leaves", nargs="+", type=int, default=[128, 256, 512, 1024, 2048, 0],
                        help="0: grown to purity (no bound)")
    parser.add_argument("--cifar-train", type=int, default=10000)
    parser.add_argument("--cifar-val", type=int, default=2000)
    parser.add_argument("--tolerance", type=float, default=0.01, help="val accuracy a bound may cost")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/bench-forest-bound"))
    parser.add_argument("--name", default="forest_bound", help="result file name in bench/results/")
    args = parser.parse_args()
    settings = params()
    trees, size = settings.baselines.forest_trees, settings.baselines.pixels_size
    rows_path = args.scratch / "rows.json"
    done: dict[str, Any] = json.loads(rows_path.read_text()) if rows_path.exists() else {}

    results: dict[str, dict[str, Any]] = {}
    for dataset in args.datasets:
        cifar = dataset == "cifar10"
        limits = {"train": args.cifar_train if cifar else None, "val": args.cifar_val if cifar else None}
        runs: dict[str, dict[str, Any]] = {}
        counts: dict[str, Any] = {}
        for seed in args.seeds:
            data = matrices(prepared(settings, dataset, seed, args.scratch), size, limits)
            counts[str(seed)] = {name: len(labels) for name, (_, labels) in data.items()}
            for key, leaves in configurations(args.leaves, len(data["train"][1])).items():
                # Everything a row depends on, so that a changed setting never reuses a stale row.
                row_key = f"{dataset}/{seed}/{key}/{limits['train']}/{limits['val']}/{trees}/{size}"
                if row_key not in done:
                    done[row_key] = fit_one(data, seed, trees, leaves, measure=seed == args.seeds[0])
                    fsio.write_json(rows_path, done)
                print(f"{dataset} seed {seed} leaves {key}: {done[row_key]}", flush=True)
                runs.setdefault(key, {})[str(seed)] = done[row_key]
        results[dataset] = {
            "images": counts,
            "by_leaves": {key: {**summary(by_seed), "seeds": by_seed} for key, by_seed in runs.items()},
        }
    write_result(args.name, {
        "setup": {
            "datasets": args.datasets, "seeds": args.seeds, "leaves": args.leaves,
            "trees": trees, "pixels_size": size,
            "image_size": {d: NATIVE_SIZE.get(d, settings.preprocess.image_size) for d in args.datasets},
            "cifar10_subset": {"train": args.cifar_train, "val": args.cifar_val},
            "train_set": "prepared train split only (no augmented copies)", "scored_on": "val (test never read)",
            "sizes_from_seed": args.seeds[0], "tolerance": args.tolerance,
        },
        "results": results,
        "chosen_max_leaf_nodes": choose(results, args.tolerance),
    })


if __name__ == "__main__":
    main()
