"""train.device -> what TensorFlow may see, checked; plus what was actually used, for the logs.

Call `configure()` before TensorFlow runs anything: hiding GPUs only works before its runtime starts.
TensorFlow silently falls back to the CPU when a GPU is missing; `device=gpu` here is an error instead.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import sys
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata

from pipeline.errors import UserError
from pipeline.params import TrainParams


class DeviceError(UserError):
    """The requested device is not available."""


@dataclass(frozen=True)
class DeviceInfo:
    type: str  # "cpu" or "gpu"
    name: str
    count: int
    mixed_precision: bool = False
    xla: bool = False
    deterministic: bool = False

    def tags(self) -> dict[str, str]:
        return {
            "device.type": self.type,
            "device.name": self.name,
            "device.count": str(self.count),
            "device.mixed_precision": str(self.mixed_precision).lower(),
            "device.xla": str(self.xla).lower(),
            "device.deterministic": str(self.deterministic).lower(),
        }


@lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(*dists: str) -> str:
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "absent"


def host_tags() -> dict[str, str]:
    """What this machine is, without importing TensorFlow (stages that do not need it stay fast)."""
    return {
        "cpu.model": cpu_model(),
        "cpu.cores": str(os.cpu_count()),
        "python.version": platform.python_version(),
        "tensorflow.version": package_version("tensorflow", "tensorflow-cpu"),
        "keras.version": package_version("keras"),
        "tf.onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset"),
    }


def cpu_only() -> DeviceInfo:
    """For stages whose output must not depend on the hardware (offline augmentation)."""
    os.environ["CUDA_VISIBLE_DEVICES"] = "-1"
    if "tensorflow" in sys.modules:  # imported already, but its runtime starts on first use: hide GPUs there too
        sys.modules["tensorflow"].config.set_visible_devices([], "GPU")
    return DeviceInfo("cpu", cpu_model(), os.cpu_count() or 1)


def configure(
    requested: str, *, mixed_precision: bool = False, xla: bool = False, deterministic: bool = False
) -> DeviceInfo:
    """Make TensorFlow use `requested` (auto|cpu|gpu) and return what it will use.

    `deterministic` turns on TensorFlow's op determinism (before any op runs): kernels whose threads add
    floats in a varying order are swapped for ordered ones, and parallel tf.data maps with random ops
    (on-the-fly augmentation) keep their order, so with the seeds set a re-run repeats every weight.
    """
    if requested not in ("auto", "cpu", "gpu"):
        raise DeviceError(f"train.device must be one of auto, cpu, gpu; got {requested!r}")
    if requested == "cpu":
        info = cpu_only()
    else:
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if not gpus and requested == "gpu":
            raise DeviceError(
                "train.device is 'gpu' but TensorFlow sees no GPU "
                f"(tensorflow {tf.__version__}, built with CUDA: {tf.test.is_built_with_cuda()}, "
                f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}). "
                "Install the gpu extra on a GPU machine (README, 'GPU'), or set train.device to auto or cpu."
            )
        if gpus:
            for gpu in gpus:  # share the card with other processes instead of grabbing all memory
                tf.config.experimental.set_memory_growth(gpu, True)
            name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
            info = DeviceInfo("gpu", name, len(gpus), mixed_precision, xla)
        else:
            info = DeviceInfo("cpu", cpu_model(), os.cpu_count() or 1)
    if info.type == "cpu" and (mixed_precision or xla):
        raise DeviceError(
            "train.mixed_precision and train.xla are GPU options, but this run uses the CPU; "
            "set them to false or run with train.device=gpu"
        )
    if info.mixed_precision:
        import keras

        keras.mixed_precision.set_global_policy("mixed_float16")
    if deterministic:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
        info = dataclasses.replace(info, deterministic=True)
    return info


def configure_training(settings: TrainParams) -> DeviceInfo:
    """configure() from the train section: what every stage that trains or infers calls first."""
    return configure(
        settings.device, mixed_precision=settings.mixed_precision, xla=settings.xla, deterministic=settings.deterministic
    )
