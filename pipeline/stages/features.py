"""features stage: the frozen backbone's pooled features for every image, computed once -> data/features.

Its own stage so that DVC caches the expensive part: changing the head (epochs, dropout,
learning rate) or fine-tuning re-runs only `transfer`, which trains on these in seconds.
Global average pooling has no weights, so pooling here is the same function as pooling in the head.
"""
from __future__ import annotations

import logging
from pathlib import Path

import keras
import numpy as np

from pipeline import cli, device, fsio, imageset, paths, tracking
from pipeline.models import backbones
from pipeline.params import Params, load_params

log = logging.getLogger("features")


def sources(params: Params) -> dict[str, Path]:
    """Which image set each features file comes from."""
    found = {split: paths.PREPARED for split in ("train", "val", "test")}
    if params.train.use_augmented:
        found["augmented"] = paths.AUGMENTED
    return found


def extract(extractor: keras.Model, images: np.ndarray, batch_size: int) -> np.ndarray:
    return np.asarray(extractor.predict(images, batch_size=batch_size, verbose=2), dtype=np.float32)


def main() -> None:
    params = load_params()
    settings = params.transfer
    info = device.configure_training(params.train)
    with tracking.stage_run("features", params, info) as run:
        base = backbones.base_model(settings.backbone, settings.image_size, backbones.weights_file(paths.WEIGHTS))
        extractor = backbones.feature_extractor(base, settings.backbone, settings.image_size)
        counts: dict[str, int] = {}
        with fsio.atomic_dir(paths.FEATURES) as out:
            for name, directory in sources(params).items():
                split = imageset.load_split(directory, "train" if name == "augmented" else name)
                log.info("%s: %d images through %s at %d px", name, len(split.labels), settings.backbone, settings.image_size)
                np.save(out / f"{name}_features.npy", extract(extractor, split.images, params.train.batch_size))
                np.save(out / f"{name}_labels.npy", split.labels)
                counts[name] = len(split.labels)
        run.images = sum(counts.values())
        run.log_metrics({"images": counts, "feature_size": int(extractor.output.shape[-1])})


if __name__ == "__main__":
    cli.run(main)
