"""The seeds' Keras networks, each taking raw uint8 images of any size (resized inside).

`mlp` and `mnist_cnn` were made for 28-px digits: they see images downscaled to
baselines.pixels_size; the photo CNNs see the prepared image size.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import keras
from keras import layers

from pipeline.models.layers import raw_image_input

KERAS_BASELINES = ("mlp", "mnist_cnn", "cnn3_small", "cnn1", "cnn3", "cnn3v2")
SMALL_INPUT = ("mlp", "mnist_cnn")  # fed baselines.pixels_size images


@dataclass(frozen=True)
class Cnn3v2:
    """The dog-breed project's cnn3v2, and the family Keras Tuner searches."""

    filters: int = 32           # first block; the next two double it
    kernel_size: int = 3
    dropout: bool = True
    dense_units: int = 128

    def body(self, x: keras.KerasTensor) -> keras.KerasTensor:
        for block in range(3):
            x = layers.Conv2D(self.filters * 2**block, self.kernel_size, padding="same", use_bias=False)(x)
            # momentum 0.9, not 0.99: with tens of steps per epoch the default's moving statistics
            # lag far behind the weights and validation sees a constant prediction.
            x = layers.BatchNormalization(momentum=0.9)(x)
            x = layers.ReLU()(x)
            x = layers.MaxPooling2D()(x)
        x = layers.GlobalAveragePooling2D()(x)
        x = layers.Dense(self.dense_units, activation="relu")(x)
        return layers.Dropout(0.5)(x) if self.dropout else x


def _mlp(x: keras.KerasTensor) -> keras.KerasTensor:
    x = layers.Flatten()(x)
    for _ in range(2):
        x = layers.Dense(512, activation="relu")(x)
        x = layers.Dropout(0.2)(x)
    return x


def _mnist_cnn(x: keras.KerasTensor) -> keras.KerasTensor:
    x = layers.Conv2D(32, 3, activation="relu")(x)
    x = layers.Conv2D(64, 3, activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Dropout(0.25)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(128, activation="relu")(x)
    return layers.Dropout(0.5)(x)


def _conv_pool_blocks(x: keras.KerasTensor, filters: tuple[int, ...], pool: int = 2) -> keras.KerasTensor:
    for count in filters:
        x = layers.Conv2D(count, 3, activation="relu")(x)
        x = layers.MaxPooling2D(pool)(x)
    return layers.Flatten()(x)


def _cnn3_small(x: keras.KerasTensor) -> keras.KerasTensor:
    """The cats-vs-dogs / chifoumi CNN (Chollet's 2016 small convnet)."""
    x = _conv_pool_blocks(x, (32, 32, 64))
    x = layers.Dense(64, activation="relu")(x)
    return layers.Dropout(0.5)(x)


def _cnn1(x: keras.KerasTensor) -> keras.KerasTensor:
    x = _conv_pool_blocks(x, (32,), pool=4)
    x = layers.Dense(128, activation="relu")(x)
    return layers.Dropout(0.5)(x)


def _cnn3(x: keras.KerasTensor) -> keras.KerasTensor:
    x = _conv_pool_blocks(x, (32, 64, 128))
    x = layers.Dense(256, activation="relu")(x)
    return layers.Dropout(0.5)(x)


_BODIES: dict[str, Callable[[keras.KerasTensor], keras.KerasTensor]] = {
    "mlp": _mlp,
    "mnist_cnn": _mnist_cnn,
    "cnn3_small": _cnn3_small,
    "cnn1": _cnn1,
    "cnn3": _cnn3,
    "cnn3v2": Cnn3v2().body,
}


def classifier(
    name: str,
    body: Callable[[keras.KerasTensor], keras.KerasTensor],
    input_size: int,
    num_classes: int,
    normalize: bool = True,
) -> keras.Model:
    inputs, x = raw_image_input(input_size)
    if normalize:
        x = layers.Rescaling(1 / 255, name="rescale")(x)
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(body(x))
    return keras.Model(inputs, outputs, name=name)


def build(
    name: str,
    image_size: int,
    pixels_size: int,
    num_classes: int,
    normalize: bool = True,
) -> keras.Model:
    size = pixels_size if name in SMALL_INPUT else image_size
    return classifier(name, _BODIES[name], size, num_classes, normalize)
