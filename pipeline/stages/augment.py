"""augment stage: seeded offline augmentation of the train split -> data/augmented + a preview grid.

Keras preprocessing layers do what ImageDataGenerator did (flip, rotation, zoom, translation,
contrast). It runs on the CPU whatever train.device says, so the same seed gives the same bytes.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline import cli, fsio, imageset, paths
from pipeline.imageset import Split
from pipeline.params import Params
from pipeline.tracking import StageRun

log = logging.getLogger("augment")


def augmented(images: np.ndarray, augmenter: Any) -> np.ndarray:
    """One random augmentation of each image of a batch, back to uint8."""
    out = np.asarray(augmenter(np.asarray(images, dtype=np.float32), training=True))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def write_copies(train: Split, copies: int, augmenter: Any, batch_size: int, writer: imageset.SplitWriter) -> None:
    """`copies` augmented versions of every train image, copy-major: record c*N + i is copy c of image i."""
    with tqdm(total=copies * train.count, desc="augment", unit="img", mininterval=2) as progress:
        for _ in range(copies):
            for batch in train.batches(batch_size):
                writer.write(augmented(batch["x"], augmenter), batch["label"], batch["index"])
                progress.update(len(batch))


def preview_grid(train: Split, copies: Split, count: int, per_row: int) -> Image.Image:
    """Rows of originals spread over the split (so over the classes), each followed by its copies."""
    picked = np.unique(np.linspace(0, train.count - 1, min(count, train.count)).astype(int))
    height, width = train.shape[:2]
    shown = min(per_row, copies.count // max(train.count, 1))
    grid = Image.new("RGB", ((1 + shown) * width, len(picked) * height), (255, 255, 255))
    for row, i in enumerate(picked):
        versions = [train.take([i])[0], *copies.take([c * train.count + i for c in range(shown)])]
        for column, image in enumerate(versions):
            grid.paste(Image.fromarray(image), (column * width, row * height))
    return grid


@cli.stage("augment", trains=False)
def main(params: Params, run: StageRun) -> None:
    settings = params.augment
    import keras

    from pipeline.models.layers import build_augmenter

    keras.utils.set_random_seed(params.seed)
    train = imageset.load_split(paths.PREPARED, "train")
    augmenter = build_augmenter(settings, params.seed)
    with fsio.atomic_dir(paths.AUGMENTED) as out:
        with imageset.SplitWriter(out, "train", train.shape, np.uint8) as writer:
            write_copies(train, settings.copies, augmenter, settings.batch_size, writer)
        copies = imageset.load_split(out, "train")
        preview = preview_grid(train, copies, settings.preview_images, per_row=4)
    paths.REPORTS.mkdir(exist_ok=True)
    with fsio.atomic_file(paths.AUGMENT_PREVIEW) as tmp:
        preview.save(tmp, format="PNG")
    run.images = copies.count
    run.record({"train_images": train.count, "augmented_images": copies.count})
    run.log_artifact(paths.AUGMENT_PREVIEW)
    log.info("%d train images -> %d augmented copies", train.count, copies.count)


if __name__ == "__main__":
    main()
