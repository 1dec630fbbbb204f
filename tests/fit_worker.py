"""One process of a distributed-training test: `python -m tests.fit_worker STRATEGY OUT.json`.

Sets up the device as a stage does (train.strategy from argv; `mirrored` first splits the CPU into two
logical devices, the stand-in for two GPUs), fits a small CNN with pipeline.training on a generated
two-class set whose classes differ by a faint colour shift, and writes the replica tags, each epoch's
figures, the validation accuracy of the model's own predictions and the steps per epoch to OUT.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from pipeline import device


def colour_set(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """12 px noise images; class 1 is a little bluer than class 0, so a few epochs reach ~90%, not 100%."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 2
    x = rng.integers(0, 200, (count, 12, 12, 3))
    x[labels == 1, :, :, 2] += 25
    return x.astype(np.uint8), labels


def main(strategy: str, out: Path) -> None:
    if strategy == "mirrored":
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    info = device.configure("cpu", deterministic=True, strategy=strategy)

    import keras

    from pipeline import training
    from pipeline.params import load_params

    from .conftest import REPO, split_on_disk

    settings = load_params(REPO / "params.yaml").train.model_copy(
        update={"batch_size": 16, "early_stopping_patience": 0, "reduce_lr_patience": 0}
    )
    scratch = out.parent / f"{out.stem}-data"
    train = split_on_disk(scratch / "train", *colour_set(256, 0))
    val = split_on_disk(scratch / "val", *colour_set(128, 1))

    class Epochs:  # training.fit's MLflow handle: here the rows it returns are enough
        def log_now(self, metrics: dict, step: int | None = None) -> None:
            pass

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((12, 12, 3)), keras.layers.Rescaling(1 / 255), keras.layers.Conv2D(8, 3, activation="relu"),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2, activation="softmax"),
    ])
    training.compile_classifier(model, 0.01, settings)
    result = training.fit(model, train, val, settings=settings, epochs=12, run=Epochs(), seed=0)
    predicted = training.predict(model, val, settings.batch_size).argmax(axis=1)
    out.write_text(json.dumps({
        "tags": info.tags(),
        "rows": result.rows,
        "global_batch": training.global_batch(settings),
        "predicted_val_accuracy": float((predicted == val.labels).mean()),
        "predictions": len(predicted),
    }))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
