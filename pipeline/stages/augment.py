"""augment stage: seeded offline augmentation of the train split -> data/augmented + a preview grid.

Keras preprocessing layers do what ImageDataGenerator did (flip, rotation, zoom, translation,
contrast). It runs on the CPU whatever train.device says, so the same seed gives the same bytes.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
from PIL import Image

from pipeline import cli, device, fsio, imageset, paths, tracking
from pipeline.params import load_params

log = logging.getLogger("augment")


def augment(images: np.ndarray, copies: int, augmenter: Any, batch_size: int) -> np.ndarray:
    """`copies` augmented versions of every image, copy-major: row c*N + i is copy c of image i."""
    out = np.empty((copies * len(images), *images.shape[1:]), dtype=np.uint8)
    for copy in range(copies):
        for start in range(0, len(images), batch_size):
            batch = np.asarray(images[start : start + batch_size], dtype=np.float32)
            augmented = np.asarray(augmenter(batch, training=True))
            row = copy * len(images) + start
            out[row : row + len(batch)] = np.clip(np.rint(augmented), 0, 255).astype(np.uint8)
    return out


def preview_grid(originals: np.ndarray, copies: np.ndarray, count: int, per_row: int) -> Image.Image:
    """Rows of originals spread over the split (so over the classes), each followed by its copies."""
    picked = np.unique(np.linspace(0, len(originals) - 1, min(count, len(originals))).astype(int))
    height, width = originals.shape[1:3]
    shown = min(per_row, len(copies) // max(len(originals), 1))
    grid = Image.new("RGB", ((1 + shown) * width, len(picked) * height), (255, 255, 255))
    for row, i in enumerate(picked):
        grid.paste(Image.fromarray(np.asarray(originals[i])), (0, row * height))
        for c in range(shown):
            grid.paste(Image.fromarray(copies[c * len(originals) + i]), ((1 + c) * width, row * height))
    return grid


def main() -> None:
    params = load_params()
    settings = params.augment
    with tracking.stage_run("augment", params, device.cpu_only()) as run:
        import keras

        from pipeline.models.layers import build_augmenter

        keras.utils.set_random_seed(params.seed)
        train = imageset.load_split(paths.PREPARED, "train")
        augmenter = build_augmenter(settings, params.seed)
        copies = augment(train.images, settings.copies, augmenter, settings.batch_size)
        source_index = np.tile(np.arange(len(train.images), dtype=np.int32), settings.copies)
        with fsio.atomic_dir(paths.AUGMENTED) as out:
            imageset.write_split(out, "train", imageset.Split(copies, train.labels[source_index]))
            np.save(out / "source_index.npy", source_index)
        paths.REPORTS.mkdir(exist_ok=True)
        with fsio.atomic_file(paths.AUGMENT_PREVIEW) as tmp:
            preview_grid(train.images, copies, settings.preview_images, per_row=4).save(tmp, format="PNG")
        run.images = len(copies)
        run.log_metrics({"train_images": len(train.images), "augmented_images": len(copies)})
        run.log_artifact(paths.AUGMENT_PREVIEW)
        log.info("%d train images -> %d augmented copies", len(train.images), len(copies))


if __name__ == "__main__":
    cli.run(main)
