"""Every model family learns: on two visibly different classes each one scores > 90% on held-out images.

A fit that changed nothing (wrong labels streamed, a frozen model, shuffled-away pixels) fails here.
"""
import shutil

import numpy as np
import pytest

from pipeline import device, tracking
from pipeline.models import classic, cnn
from pipeline.stages import baselines

from .conftest import REPO, split_on_disk


def two_classes(count, seed):
    """Noise photos: class 0 has a red top-left block, class 1 a blue bottom-right one."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 120, (count, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(count) % 2
    images[labels == 0, :14, :14] = (230, 20, 20)
    images[labels == 1, 18:, 18:] = (20, 20, 230)
    return images, labels


@pytest.fixture(scope="module")
def stage(tmp_path_factory, request):
    """Train/val splits on disk and an open `baselines` stage run in a scratch workspace."""
    from pipeline.params import load_params

    root = tmp_path_factory.mktemp("learning")
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    patch = pytest.MonkeyPatch()
    patch.chdir(root)
    patch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = load_params(REPO / "params.yaml")
    params = params.model_copy(update={
        "preprocess": params.preprocess.model_copy(update={"image_size": 32}),
        "train": params.train.model_copy(update={"batch_size": 16, "early_stopping_patience": 0}),
        "baselines": params.baselines.model_copy(update={"epochs": 8, "learning_rate": 0.003, "pixels_size": 16,
                                                         "forest_trees": 50}),
    })
    train = split_on_disk(root / "train", *two_classes(96, seed=0))
    val = split_on_disk(root / "val", *two_classes(40, seed=1))
    with tracking.stage_run("baselines", params, device.cpu_only()) as run:
        yield params, train, val, run, root
    patch.undo()


@pytest.mark.parametrize("name", classic.CLASSIC_BASELINES + cnn.KERAS_BASELINES)
def test_model_family_learns_two_easy_classes(stage, name):
    params, train, val, run, root = stage
    out, curves = root / "models", root / "curves"
    out.mkdir(exist_ok=True)
    curves.mkdir(exist_ok=True)
    with run.nested(name, {"model": name}):
        if name in classic.CLASSIC_BASELINES:
            result, _ = baselines.train_classic(name, train, val, params, ["red", "blue"], out)
        else:
            result, _ = baselines.train_keras(name, train, val, params, ["red", "blue"], out, curves, run)
    assert result["val_accuracy"] > 0.9, result
