"""The keras.applications backbones the pipeline can use, in one table.

No Keras import here: params validates `transfer.backbone` against it and download fetches the weights it
names at no start-up cost; models/backbones.py and models/layers.py build from it. The weight files and
their checksums are the ones keras.applications itself fetches (ImageNet, without the classifier top).
"""
from __future__ import annotations

from dataclasses import dataclass, field

_KERAS_APPLICATIONS = "https://storage.googleapis.com/tensorflow/keras-applications/"


@dataclass(frozen=True)
class Backbone:
    constructor: str  # keras.applications.<constructor>
    module: str  # keras.applications.<module>.preprocess_input
    notop_weights: tuple[str, str] | None  # (URL, checksum); None where Keras pins no single file
    # Block name -> the layer whose input is that block's output: where `transfer.features_block` cuts the
    # base. Named layers, not Keras' auto-numbered `add_N`, whose numbers depend on what was built before.
    blocks: dict[str, str] = field(default_factory=dict)


BACKBONES: dict[str, Backbone] = {
    "xception": Backbone("Xception", "xception", (
        _KERAS_APPLICATIONS + "xception/xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "md5:b0042744bf5b25fce3cb969f33bebb97",
    ), {f"block{n}": f"block{n + 1}_sepconv1_act" for n in range(4, 13)} | {"block13": "block14_sepconv1"}),
    "vgg16": Backbone("VGG16", "vgg16", (
        _KERAS_APPLICATIONS + "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "md5:6d6bbae143d832006294945121d1f1fc",
    )),
    "resnet50v2": Backbone("ResNet50V2", "resnet_v2", (
        _KERAS_APPLICATIONS + "resnet/resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "md5:fac2f116257151a9d068a22e544a4917",
    )),
    # Its file depends on the width multiplier and input size, and Keras pins no checksum for it.
    "mobilenetv2": Backbone("MobileNetV2", "mobilenet_v2", None),
    "efficientnetb0": Backbone("EfficientNetB0", "efficientnet", (
        "https://storage.googleapis.com/keras-applications/efficientnetb0_notop.h5",
        "md5:50bc09e76180e00e4465e1a485ddc09d",
    )),
    "inceptionv3": Backbone("InceptionV3", "inception_v3", (
        _KERAS_APPLICATIONS + "inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "md5:bcbd6486424b2319ff4ef7d526e38f63",
    )),
    "densenet121": Backbone("DenseNet121", "densenet", (
        _KERAS_APPLICATIONS + "densenet/densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "md5:30ee3e1110167f948a6b9946edeeb738",
    )),
}
