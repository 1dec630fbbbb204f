"""train.deterministic: two runs of the same Keras fit, in fresh processes, end with identical weights."""
import os
import subprocess
import sys
import textwrap

from .conftest import REPO, split_on_disk
from .test_learning import two_classes

FIT = """
import hashlib, sys
from pathlib import Path
import keras
from pipeline import device, imageset, training
from pipeline.models import cnn
from pipeline.params import load_params

params = load_params({params!r})
settings = params.train.model_copy(update={{"batch_size": 16, "augment_on_the_fly": True}})
assert settings.deterministic  # the default
device.configure_training(settings)
keras.utils.set_random_seed(params.seed)

class Quiet:
    def log_now(self, metrics, step=None):
        pass

train, val = imageset.load_split(Path({data!r}), "train"), imageset.load_split(Path({data!r}), "val")
model = cnn.build("cnn3_small", 32, 16, 2, True)
training.compile_classifier(model, 0.003, settings)
augment = training.on_the_fly(params.model_copy(update={{"train": settings}}))
training.fit(model, train, val, settings=settings, epochs=2, run=Quiet(), seed=params.seed, **augment)
print(hashlib.sha256(b"".join(w.tobytes() for w in model.get_weights())).hexdigest())
"""


def test_two_runs_of_a_keras_fit_give_identical_weights(tmp_path):
    split_on_disk(tmp_path, *two_classes(96, seed=0), name="train")
    split_on_disk(tmp_path, *two_classes(32, seed=1), name="val")
    code = textwrap.dedent(FIT.format(params=str(REPO / "params.yaml"), data=str(tmp_path)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "-1"}
    hashes = [
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=True)
        .stdout.split()[-1]
        for _ in range(2)
    ]
    assert len(hashes[0]) == 64 and hashes[0] == hashes[1]
