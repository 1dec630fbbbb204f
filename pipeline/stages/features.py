"""features stage: the frozen backbone's pooled features for every image, computed once -> data/features.

Its own stage so that DVC caches the expensive part: changing the head (epochs, dropout,
learning rate) or fine-tuning re-runs only `transfer`, which trains on these in seconds.
Global average pooling has no weights, so pooling here is the same function as pooling in the head.
Images stream through the backbone a batch at a time and their features are written as they come,
in the image set's format (one float32 vector per record, with the image's label and index).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pipeline import cli, fsio, imageset, paths
from pipeline.models import backbones
from pipeline.params import Params
from pipeline.tracking import StageRun

log = logging.getLogger("features")


def sources(params: Params) -> dict[str, tuple[Path, str]]:
    """Each features split: the image set and split it comes from."""
    found = {split: (paths.PREPARED, split) for split in ("train", "val", "test")}
    if params.train.use_augmented:
        found["augmented"] = (paths.AUGMENTED, "train")
    return found


@cli.stage("features")
def main(params: Params, run: StageRun) -> None:
    settings = params.transfer
    base = backbones.base_model(
        settings.backbone, settings.image_size, backbones.weights_file(paths.WEIGHTS), settings.features_block
    )
    extractor = backbones.feature_extractor(base, settings.backbone, settings.image_size)
    feature_size = int(extractor.output.shape[-1])
    counts: dict[str, int] = {}
    with fsio.atomic_dir(paths.FEATURES) as out:
        for name, (directory, split_name) in sources(params).items():
            images = imageset.load_split(directory, split_name)
            log.info("%s: %d images through %s at %d px", name, images.count, settings.backbone, settings.image_size)
            with imageset.SplitWriter(out, name, (feature_size,), np.float32) as writer:
                backbones.extract_features(extractor, images, params.train.batch_size, writer)
            counts[name] = images.count
    run.images = sum(counts.values())
    run.record({"images": counts, "feature_size": feature_size})


if __name__ == "__main__":
    main()
