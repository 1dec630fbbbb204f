"""Which transfer recipe generalises to unseen hands (issue 10.5), judged by validation accuracy only.

    python -m bench.transfer_recipes [--dataset rps] [--seeds 42 1 2] [--cache DIR]

The frozen Xception's features of every photo (and of its mirror image) are computed once, at the size the
pipeline stores (preprocess.image_size) resized inside the model to each transfer.image_size tried, exactly
as the features stage does; every recipe is then a head trained on them, on the split preprocess makes for
each seed (same groups, fractions and assignment; files with identical bytes are not merged here). Recipes are
ranked by mean validation accuracy over the seeds; test accuracy is computed for the winner only, after the choice, so the ranking never sees it.
"""
from __future__ import annotations

import argparse
import itertools
import re
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    SHARED,
    XCEPTION_WEIGHTS,
    class_files,
    params,
    timed,
    write_result,
)
from pipeline.images import load_array
from pipeline.splitting import assign_splits, group_of


def photos(dataset: str, stored_size: int) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """(uint8 images as preprocess stores them, labels, classes, file names)."""
    root = SHARED / "datasets" / dataset
    files = class_files(root)
    classes = sorted({label for _, label in files})
    images = np.stack([load_array(root / path, size=stored_size, resize="stretch", max_pixels=89478485) for path, _ in files])
    labels = np.array([classes.index(label) for _, label in files])
    return images, labels, classes, [path for path, _ in files]


def features(images: np.ndarray, image_size: int) -> dict[str, np.ndarray]:
    """Pooled features of the last block (average and max) and of the middle flow's end, for images and mirrors."""
    import keras

    from pipeline.models.backbones import base_model
    from pipeline.models.layers import BackbonePreprocess, raw_image_input

    base = base_model("xception", image_size, XCEPTION_WEIGHTS)
    base.trainable = False
    inputs, x = raw_image_input(image_size)
    x = BackbonePreprocess("xception")(x)
    probe = keras.Model(base.input, [base.output, base.get_layer("add_11").output])
    last, middle = probe(x, training=False)
    pooled = [keras.layers.GlobalAveragePooling2D()(last), keras.layers.GlobalMaxPooling2D()(last),
              keras.layers.GlobalAveragePooling2D()(middle)]
    extractor = keras.Model(inputs, pooled)
    out: dict[str, list[np.ndarray]] = {}
    for flipped in (False, True):
        source = images[:, :, ::-1] if flipped else images
        for start in range(0, len(source), 32):
            batch = extractor.predict_on_batch(source[start : start + 32])
            for name, value in zip(("avg", "max", "mid"), batch):
                out.setdefault(f"{name}{'_flip' if flipped else ''}", []).append(np.asarray(value))
    return {name: np.concatenate(parts) for name, parts in out.items()}


def split_of(
    files: list[str], labels: np.ndarray, classes: list[str], pattern: str | None, fractions: dict[str, float], seed: int
) -> np.ndarray:
    compiled = re.compile(pattern) if pattern else None
    groups = [group_of(path, compiled) for path in files]
    return assign_splits(labels, groups, fractions, seed, classes)


def head_probabilities(train_x: np.ndarray, train_y: np.ndarray, tests: list[np.ndarray], head: dict[str, Any], seed: int) -> list[np.ndarray]:
    """A head fitted on (train_x, train_y): the pipeline's softmax head, or an L2 logistic regression."""
    if head["kind"] == "logistic":
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        model = make_pipeline(StandardScaler(), LogisticRegression(C=head["C"], max_iter=2000, random_state=seed))
        model.fit(train_x, train_y)
        return [model.predict_proba(x) for x in tests]
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((train_x.shape[1],)), keras.layers.Dropout(head["dropout"]),
                              keras.layers.Dense(int(train_y.max()) + 1, activation="softmax")])
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    model.fit(train_x, train_y, epochs=head["epochs"], batch_size=32, verbose=0)
    return [model.predict(x, verbose=0) for x in tests]


def score(feats: dict[str, np.ndarray], labels: np.ndarray, splits: np.ndarray, recipe: dict[str, Any], seed: int, evaluate: tuple[int, ...]) -> list[float]:
    """Accuracy on each split index in `evaluate` for one recipe and one seed's split."""
    def view(flipped: bool) -> np.ndarray:
        return np.concatenate([feats[f"{name}_flip" if flipped else name] for name in recipe["features"]], axis=1)

    plain, mirror = view(False), view(True)
    train = splits == 0
    train_x, train_y = plain[train], labels[train]
    if recipe["train_flips"]:
        train_x, train_y = np.concatenate([train_x, mirror[train]]), np.concatenate([train_y, train_y])
    wanted = [splits == index for index in evaluate]
    tests = [plain[mask] for mask in wanted] + ([mirror[mask] for mask in wanted] if recipe["tta"] else [])
    probabilities = head_probabilities(train_x, train_y, tests, recipe["head"], seed)
    if recipe["tta"]:
        probabilities = [(a + b) / 2 for a, b in zip(probabilities[: len(wanted)], probabilities[len(wanted) :])]
    return [float(np.mean(p.argmax(1) == labels[mask])) for p, mask in zip(probabilities, wanted)]


def recipes() -> list[dict[str, Any]]:
    heads = [{"kind": "softmax", "dropout": 0.2, "epochs": 20}, {"kind": "softmax", "dropout": 0.5, "epochs": 40}]
    heads += [{"kind": "logistic", "C": c} for c in (0.001, 0.01, 0.1)]
    feature_sets = [("avg",), ("avg", "max"), ("mid",), ("avg", "mid")]
    return [
        {"features": list(f), "head": h, "train_flips": flips, "tta": tta}
        for f, h, flips, tta in itertools.product(feature_sets, heads, (False, True), (False, True))
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="rps")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[224])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/transfer_recipes"))
    args = parser.parse_args()
    settings = params()
    stored = settings.preprocess.image_size
    pattern = settings.data.datasets[args.dataset].group_pattern if args.dataset in settings.data.datasets else None
    images, labels, classes, files = photos(args.dataset, stored)
    fractions = settings.preprocess.splits.as_dict()
    splits = {seed: split_of(files, labels, classes, pattern, fractions, seed) for seed in args.seeds}
    rows: list[dict[str, Any]] = []
    extraction: dict[int, float] = {}
    for size in args.image_sizes:
        cache = args.cache / f"{args.dataset}-{stored}-{size}.npz"
        if not cache.exists():
            cache.parent.mkdir(parents=True, exist_ok=True)
            computed, extraction[size] = timed(features, images, size)
            np.savez(cache, **computed)
        feats = dict(np.load(cache))
        for recipe in recipes():
            val = [score(feats, labels, splits[seed], recipe, seed, (1,))[0] for seed in args.seeds]
            rows.append({"image_size": size, **recipe, "val": val, "val_mean": float(np.mean(val))})
            print(f"{size} {recipe} val {np.round(val, 3)} mean {np.mean(val):.3f}", flush=True)
    rows.sort(key=lambda row: -row["val_mean"])
    best = rows[0]
    feats = dict(np.load(args.cache / f"{args.dataset}-{stored}-{best['image_size']}.npz"))
    best["test"] = [score(feats, labels, splits[seed], best, seed, (2,))[0] for seed in args.seeds]
    best["test_mean"] = float(np.mean(best["test"]))
    print("chosen by validation:", best)
    write_result(f"transfer_recipes_{args.dataset}", {
        "dataset": args.dataset, "stored_size": stored, "seeds": args.seeds, "images": len(labels),
        "feature_seconds": extraction, "chosen": best, "recipes": rows,
    })


if __name__ == "__main__":
    main()
