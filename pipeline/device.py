"""train.device -> what TensorFlow may see, checked; plus what was actually used, for the logs.

Call `configure()` before TensorFlow runs anything: hiding GPUs only works before its runtime starts.
TensorFlow silently falls back to the CPU when a GPU is missing; `device=gpu` here is an error instead.
train.strategy picks a tf.distribute strategy and makes it the process's default, so every model a stage
builds, fits or loads afterwards is replicated without the stage knowing (pipeline.training sizes the batch).
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from typing import Any

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
    strategy: str = "none"  # the tf.distribute strategy in force: none, mirrored or multi_worker
    replicas: tuple[str, ...] = ()  # every replica's device, on every worker
    task: str = ""  # multi_worker: this process's TF_CONFIG task, e.g. "worker:1"

    def tags(self) -> dict[str, str]:
        return {
            "device.type": self.type,
            "device.name": self.name,
            "device.count": str(self.count),
            "device.mixed_precision": str(self.mixed_precision).lower(),
            "device.xla": str(self.xla).lower(),
            "device.deterministic": str(self.deterministic).lower(),
            "device.strategy": self.strategy,
            "device.replica_count": str(max(1, len(self.replicas))),
            "device.replicas": ",".join(self.replicas) or f"/device:{self.type.upper()}:0",  # no strategy: one
            **({"device.task": self.task} if self.task else {}),
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


def tf_config_task() -> tuple[dict[str, list[str]], str, int]:
    """TF_CONFIG's cluster and this process's task (type, index), checked: MultiWorkerMirroredStrategy
    would otherwise fail deep inside TensorFlow, or wait for a worker that is not in the cluster."""
    raw = os.environ.get("TF_CONFIG")
    example = '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}'
    if not raw:
        raise DeviceError(f"train.strategy is 'multi_worker' but TF_CONFIG is not set: give each process one, e.g. {example}")
    try:
        config = json.loads(raw)
        cluster, task = config["cluster"], config["task"]
        kind, index = task["type"], int(task["index"])
        ok = isinstance(cluster.get(kind), list) and 0 <= index < len(cluster[kind])
    except (ValueError, TypeError, KeyError, AttributeError):
        ok = False
    if not ok:
        raise DeviceError(f"TF_CONFIG must name a cluster and this process's task in it, e.g. {example}; got {raw}")
    return cluster, kind, index


def distribution(name: str, gpus: int) -> Any:
    """train.strategy -> a tf.distribute strategy, or None for TensorFlow's default (one device).

    auto: MirroredStrategy over the GPUs when there are several. mirrored: over the GPUs, or over the
    logical CPU devices where there is no GPU (tests split the CPU in two as a stand-in); one device is an
    error, not a silent single-device run. multi_worker: MultiWorkerMirroredStrategy over TF_CONFIG's cluster.
    """
    if name == "auto":
        name = "mirrored" if gpus > 1 else "none"
    if name == "none":
        return None
    import tensorflow as tf

    if name == "mirrored":
        devices = [d.name for d in tf.config.list_logical_devices("GPU" if gpus else "CPU")]
        if len(devices) < 2:
            raise DeviceError(
                f"train.strategy is 'mirrored' but TensorFlow sees one device ({', '.join(devices)}): "
                "MirroredStrategy needs two or more GPUs; set train.strategy to auto or none"
            )
        return tf.distribute.MirroredStrategy(devices)
    tf_config_task()
    return keras_multi_worker_strategy()


def keras_multi_worker_strategy() -> Any:
    """MultiWorkerMirroredStrategy whose `reduce` takes what Keras 3 gives it.

    Keras 3.15's fit under this strategy fails twice (keras-team/keras#20585, open): it reduces the first
    (x, y) batch as one value, which this strategy (unlike MirroredStrategy) does not map over, and it
    reduces every scalar log along axis 0. Here each value of a structure is reduced on its own, a scalar
    across the replicas, which is what Keras does under MirroredStrategy.
    """
    import tensorflow as tf

    class KerasMultiWorkerStrategy(tf.distribute.MultiWorkerMirroredStrategy):
        def reduce(self, reduce_op: Any, value: Any, axis: int | None) -> Any:
            def one(part: Any) -> Any:
                rank = self.experimental_local_results(part)[0].shape.rank
                return super(KerasMultiWorkerStrategy, self).reduce(reduce_op, part, axis if rank else None)

            return tf.nest.map_structure(one, value)

    return KerasMultiWorkerStrategy()


def replica_devices(strategy: Any) -> tuple[tuple[str, ...], str]:
    """Every replica's device name, on every worker of a multi-worker cluster (each worker has the same
    local devices: MultiWorkerMirroredStrategy requires it), and this process's task ("" on one machine)."""
    local = tuple(strategy.extended.worker_devices)
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().jobs:
        return local, ""
    spec = resolver.cluster_spec()
    suffixes = [name.rsplit("/", 1)[-1] for name in local]  # device:CPU:0
    every = tuple(
        f"/job:{job}/replica:0/task:{task}/{suffix}"
        for job in sorted(spec.jobs, key=lambda job: job != "chief")  # the chief first, as TF_CONFIG counts it
        for task in range(spec.num_tasks(job))
        for suffix in suffixes
    )
    return every, f"{resolver.task_type}:{resolver.task_id}"


def configure(
    requested: str,
    *,
    mixed_precision: bool = False,
    xla: bool = False,
    deterministic: bool = False,
    strategy: str = "none",
) -> DeviceInfo:
    """Make TensorFlow use `requested` (auto|cpu|gpu) and return what it will use.

    `deterministic` turns on TensorFlow's op determinism (before any op runs): kernels whose threads add
    floats in a varying order are swapped for ordered ones, and parallel tf.data maps with random ops
    (on-the-fly augmentation) keep their order, so with the seeds set a re-run repeats every weight.
    `strategy` (train.strategy) becomes the default tf.distribute strategy of the process.
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
    chosen = distribution(strategy, info.count if info.type == "gpu" else 0)
    if chosen is not None:
        import tensorflow as tf

        tf.distribute.experimental_set_strategy(chosen)
        replicas, task = replica_devices(chosen)
        kind = "multi_worker" if isinstance(chosen, tf.distribute.MultiWorkerMirroredStrategy) else "mirrored"
        info = dataclasses.replace(info, strategy=kind, replicas=replicas, task=task)
    return info


def configure_training(settings: TrainParams) -> DeviceInfo:
    """configure() from the train section: what every stage that trains or infers calls first."""
    return configure(
        settings.device, mixed_precision=settings.mixed_precision, xla=settings.xla,
        deterministic=settings.deterministic, strategy=settings.strategy,
    )
