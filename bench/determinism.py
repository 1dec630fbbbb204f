"""What TensorFlow's op determinism (train.deterministic) costs: cnn3_small training images/s with and without.

    python -m bench.determinism [--train 600] [--epochs 3] [--repeats 2]

Each fit runs in a fresh process (op determinism is process-wide once on), on the same rps sample at
128 px (split by shot, shards on disk as the stages read them), with the same seed, plateau callbacks and
on-the-fly augmentation (the parallel tf.data map that determinism must keep in order); arms interleaved.
Every fit's weights are hashed too: the deterministic arm must repeat its hash, the default one may not.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import common


def child(data: Path, deterministic: bool, epochs: int) -> dict[str, float | str]:
    """One fit of cnn3_small, as the baselines stage fits it; its images/s and a hash of its weights."""
    from pipeline import device, imageset, training
    from pipeline.models import cnn

    params = common.params()
    settings = params.train.model_copy(update={"deterministic": deterministic, "augment_on_the_fly": True})
    device.configure_training(settings)
    import keras

    keras.utils.set_random_seed(params.seed)
    train, val = imageset.load_split(data, "train"), imageset.load_split(data, "val")
    model = cnn.build("cnn3_small", params.preprocess.image_size, params.baselines.pixels_size, 3, True)
    training.compile_classifier(model, params.baselines.learning_rate, settings)
    on_the_fly = training.on_the_fly(params.model_copy(update={"train": settings}))
    _, seconds = common.timed(
        training.fit, model, train, val, settings=settings, epochs=epochs, run=common.NoTracking(), seed=params.seed,  # type: ignore[arg-type]
        **on_the_fly,
    )
    weights = hashlib.sha256(b"".join(w.tobytes() for w in model.get_weights())).hexdigest()[:16]
    return {"images_per_second": round(epochs * train.count / seconds, 2), "seconds": round(seconds, 2), "weights": weights}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", choices=("deterministic", "default"), help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.data, args.child == "deterministic", args.epochs)))
        return

    params = common.params()
    arms: dict[str, list[dict]] = {"deterministic": [], "default": []}
    with tempfile.TemporaryDirectory() as scratch:
        common.rps_sample(common.RPS, params.preprocess, {"train": args.train, "val": 150}, params.seed, Path(scratch))
        for _ in range(args.repeats):
            for arm, fits in arms.items():
                done = subprocess.run(
                    [sys.executable, "-m", "bench.determinism", "--child", arm, "--data", scratch, "--epochs", str(args.epochs)],
                    capture_output=True, text=True, check=True, env=common.venv_env(), cwd=common.ROOT,
                )
                fits.append(json.loads(done.stdout.strip().splitlines()[-1]))
    best = {arm: max(fit["images_per_second"] for fit in fits) for arm, fits in arms.items()}
    common.write_result("determinism", {
        "train_images": args.train, "epochs": args.epochs, "fits": arms,
        "images_per_second": best,
        "deterministic_over_default": round(best["deterministic"] / best["default"], 3),
        "deterministic_weights_repeat": len({fit["weights"] for fit in arms["deterministic"]}) == 1,
        "default_weights_repeat": len({fit["weights"] for fit in arms["default"]}) == 1,
    })


if __name__ == "__main__":
    main()
