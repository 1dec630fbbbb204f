"""train.device is honoured or refused: never a silent fallback to the CPU."""
import subprocess
import sys

import pytest

from pipeline import device


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_gpu_without_a_gpu_is_a_clear_error():
    done = run_python(
        "import tensorflow as tf, sys\n"
        "if tf.config.list_physical_devices('GPU'): sys.exit(99)\n"
        "from pipeline import cli, device\n"
        "cli.run(lambda: device.configure('gpu'))\n"
    )
    if done.returncode == 99:
        pytest.skip("this machine has a GPU")
    assert done.returncode == 2, done.stderr
    assert "error: train.device is 'gpu' but TensorFlow sees no GPU" in done.stderr
    assert "Traceback" not in done.stderr


def test_cpu_hides_gpus_before_tensorflow_starts():
    done = run_python(
        "from pipeline import device\n"
        "info = device.configure('cpu')\n"
        "import os, tensorflow as tf\n"
        "print(info.type, os.environ['CUDA_VISIBLE_DEVICES'], len(tf.config.list_physical_devices('GPU')),"
        " os.environ['TF_ENABLE_ONEDNN_OPTS'])\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["cpu", "-1", "0", "1"]


def test_gpu_only_options_on_the_cpu_are_refused(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    with pytest.raises(device.DeviceError, match="mixed_precision and train.xla are GPU options"):
        device.configure("cpu", mixed_precision=True)


def test_device_and_host_tags():
    info = device.DeviceInfo("gpu", "NVIDIA H100", 2)
    assert info.tags()["device.name"] == "NVIDIA H100" and info.tags()["device.count"] == "2"
    host = device.host_tags()
    assert int(host["cpu.cores"]) >= 1 and host["keras.version"].startswith("3.")
    assert host["tensorflow.version"] != "absent" and host["tf.onednn"] == "1"
