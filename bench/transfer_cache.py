"""Transfer learning on cached features vs re-running the frozen base every epoch (the Keras guide's way).

Same images, epochs, head and seed in both arms; the cached arm pays for one extraction pass.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from bench import common


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=common.RPS, help="class-per-folder photos")
    parser.add_argument("--weights", type=Path, default=common.XCEPTION_WEIGHTS)
    parser.add_argument("--image-size", type=int, default=128, help="decoded size and the backbone's input size")
    parser.add_argument("--train-images", type=int, default=300)
    parser.add_argument("--val-images", type=int, default=150)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-transfer-cache-") as tmp:
        run(args, Path(tmp))


def run(args: argparse.Namespace, scratch: Path) -> None:
    params = common.params()
    settings = params.preprocess.model_copy(update={"image_size": args.image_size})
    (scratch / "prepared").mkdir()
    (scratch / "features").mkdir()
    classes, data = common.rps_sample(
        args.data, settings, {"train": args.train_images, "val": args.val_images}, params.seed, scratch / "prepared"
    )
    train, val = data["train"], data["val"]
    train_labels, val_labels = train.labels.astype(np.int32), val.labels.astype(np.int32)

    import keras

    from pipeline import imageset, training
    from pipeline.models import backbones

    batch = params.train.batch_size
    base = backbones.base_model("xception", args.image_size, args.weights)
    extractor = backbones.feature_extractor(base, "xception", args.image_size)
    feature_size = int(extractor.output.shape[-1])

    def fresh_head() -> keras.Model:
        keras.utils.set_random_seed(params.seed)  # same init, dropout masks and shuffling in both arms
        return backbones.build_head(feature_size, len(classes), params.transfer.dropout)

    def fit(model: keras.Model, x: np.ndarray, vx: np.ndarray) -> dict[str, float]:
        # No early stopping: both arms must run exactly the same epochs.
        training.compile_classifier(model, params.transfer.learning_rate, params.train)
        history = model.fit(x, train_labels, validation_data=(vx, val_labels), epochs=args.epochs,
                            batch_size=batch, shuffle=True, verbose=2).history
        return {"val_accuracy": round(history["val_accuracy"][-1], 4), "val_loss": round(history["val_loss"][-1], 4)}

    def cache_features() -> tuple[np.ndarray, np.ndarray]:
        """As the features stage does: stream each split through the extractor into a features split."""
        found = []
        for name, split in (("train", train), ("val", val)):
            with imageset.SplitWriter(scratch / "features", name, (feature_size,), np.float32) as writer:
                backbones.extract_features(extractor, split, batch, writer)
            found.append(common.in_memory(imageset.load_split(scratch / "features", name))[0])
        return found[0], found[1]

    (train_features, val_features), extract_seconds = common.timed(cache_features)
    head = fresh_head()
    initial = [w.copy() for w in head.get_weights()]
    cached, cached_fit_seconds = common.timed(fit, head, train_features, val_features)

    head2 = fresh_head()
    same_init = all(np.array_equal(a, b) for a, b in zip(initial, head2.get_weights()))
    model = keras.Model(extractor.input, head2(extractor.output), name="uncached")
    # The guide's arm gets the decoded images in memory, read before its clock starts.
    train_images, val_images = common.in_memory(train)[0], common.in_memory(val)[0]
    uncached, uncached_seconds = common.timed(fit, model, train_images, val_images)

    cached_seconds = extract_seconds + cached_fit_seconds
    speedup = uncached_seconds / cached_seconds
    accuracy_gap = abs(cached["val_accuracy"] - uncached["val_accuracy"]) * 100
    common.write_result("transfer_cache", {
        "setup": {
            "backbone": "xception", "image_size": args.image_size, "epochs": args.epochs, "batch_size": batch,
            "train_images": train.count, "val_images": val.count, "classes": classes,
            "dropout": params.transfer.dropout, "learning_rate": params.transfer.learning_rate,
            "seed": params.seed, "same_head_init": same_init,
        },
        "cached": {
            "extract_seconds": round(extract_seconds, 3),
            "fit_seconds": round(cached_fit_seconds, 3),
            "total_seconds": round(cached_seconds, 3),
            **cached,
        },
        "uncached": {"total_seconds": round(uncached_seconds, 3), **uncached},
        "speedup": round(speedup, 2),
        "val_accuracy_gap_points": round(accuracy_gap, 2),
        "targets": {
            "speedup_at_least_5x": speedup >= 5,
            "val_accuracy_within_half_point": accuracy_gap <= 0.5,
        },
    })


if __name__ == "__main__":
    main()
