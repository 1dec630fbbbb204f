"""Layers that travel inside saved models, so an exported model takes raw uint8 images.

Registered as Keras serializables when this module is imported (models/saved.py's load does): models
holding them then load with `safe_mode=True` (no Lambda layers, nothing that needs unsafe deserialisation).
"""
from __future__ import annotations

from typing import Any

import keras

from pipeline.models.catalog import BACKBONES
from pipeline.params import AugmentParams


def build_augmenter(settings: AugmentParams, seed: int) -> keras.Sequential:
    """What ImageDataGenerator did, as Keras preprocessing layers: active only while training."""
    layers: list[Any] = []
    if settings.flip != "none":
        layers.append(keras.layers.RandomFlip(settings.flip, seed=seed))
    if settings.rotation:
        layers.append(keras.layers.RandomRotation(settings.rotation, fill_mode="reflect", seed=seed + 1))
    if settings.zoom:
        layers.append(keras.layers.RandomZoom(settings.zoom, fill_mode="reflect", seed=seed + 2))
    if settings.translation:
        layers.append(
            keras.layers.RandomTranslation(settings.translation, settings.translation, fill_mode="reflect", seed=seed + 3)
        )
    if settings.contrast:
        layers.append(keras.layers.RandomContrast(settings.contrast, value_range=(0, 255), seed=seed + 4))
    return keras.Sequential(layers or [keras.layers.Identity()], name="augmenter")


@keras.saving.register_keras_serializable(package="pipeline")
class BackbonePreprocess(keras.layers.Layer):
    """The backbone's own `preprocess_input` (scaling, channel order, mean), inside the model."""

    def __init__(self, backbone: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.backbone = backbone
        self._preprocess = getattr(keras.applications, BACKBONES[backbone].module).preprocess_input

    def call(self, inputs: Any) -> Any:
        return self._preprocess(keras.ops.cast(inputs, "float32"))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "backbone": self.backbone}


def raw_image_input(size: int) -> tuple[keras.KerasTensor, Any]:
    """An input for RGB images (0-255) of any size, resized to `size`."""
    inputs = keras.Input(shape=(None, None, 3), name="image")
    return inputs, keras.layers.Resizing(size, size, name="resize")(inputs)
