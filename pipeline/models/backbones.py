"""keras.applications backbones by name (models/catalog.py): the frozen feature extractor, its features of
an image set, and the classifier head trained on them."""
from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
from tqdm import tqdm

from pipeline import fsio, imageset
from pipeline.errors import UserError
from pipeline.imageset import Split
from pipeline.models.catalog import BACKBONES
from pipeline.models.layers import BackbonePreprocess, raw_image_input


def weights_file(weights_dir: Path) -> Path | None:
    """The backbone weights the download stage put in place (weights.json), or None for random ones."""
    record = fsio.read_json(weights_dir / "weights.json")
    return weights_dir / record["file"] if record["file"] else None


def base_model(backbone: str, image_size: int, weights: Path | None, block: str | None = None) -> keras.Model:
    """The convolutional base without its top; ImageNet weights from a local file, or random. With `block`
    (a name from the catalog), the base ends at that block's output: the blocks after it are never run."""
    constructor = getattr(keras.applications, BACKBONES[backbone].constructor)
    try:
        base = constructor(
            include_top=False,
            weights=str(weights) if weights else None,
            input_shape=(image_size, image_size, 3),
        )
    except ValueError as exc:  # a too-small input, or weights for another architecture
        raise UserError(f"cannot build {backbone} at transfer.image_size={image_size} with weights {weights}: {exc}") from None
    if block is None:
        return base
    return keras.Model(base.input, base.get_layer(BACKBONES[backbone].blocks[block]).input, name=f"{base.name}_to_{block}")


def feature_extractor(base: keras.Model, backbone: str, image_size: int) -> keras.Model:
    """Raw uint8 images -> pooled features of the frozen base (inference-mode BatchNorm)."""
    base.trainable = False
    inputs, x = raw_image_input(image_size)
    x = BackbonePreprocess(backbone, name="backbone_preprocess")(x)
    x = base(x, training=False)
    features = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, features, name=f"{backbone}_features")


def build_head(feature_size: int, num_classes: int, dropout: float) -> keras.Model:
    features = keras.Input(shape=(feature_size,), name="features")
    x = keras.layers.Dropout(dropout, name="head_dropout")(features)
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(features, outputs, name="head")


def extract_features(extractor: keras.Model, images: Split, batch_size: int, writer: imageset.SplitWriter) -> None:
    """Every image's features, in record order, written a batch at a time."""
    position = 0
    with tqdm(total=images.count, desc="features", unit="img", mininterval=5) as progress:
        for batch, _ in imageset.stream(images, batch_size):
            features = np.asarray(extractor.predict_on_batch(batch), dtype=np.float32)
            rows = images.rows[position : position + len(features)]
            writer.write(features, rows["label"], rows["index"])
            position += len(features)
            progress.update(len(features))
