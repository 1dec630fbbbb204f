"""Transfer: the head trained on cached features is the same function as the exported raw-image model."""
import shutil

import keras
import numpy as np
import pytest

from pipeline import device, tracking, training
from pipeline.models import backbones, saved
from pipeline.stages import transfer

from .conftest import REPO, split_on_disk


@pytest.fixture
def settings(params):
    return params.transfer.model_copy(update={"image_size": 71})


@pytest.fixture
def base(settings):
    keras.utils.set_random_seed(0)
    return backbones.base_model(settings.backbone, settings.image_size, None)  # random weights: no download


def images(count=6, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, 40, 40, 3), dtype=np.uint8)


def test_export_matches_head_on_cached_features_and_reloads_safely(base, settings, params, tmp_path):
    raw = images()
    features = backbones.feature_extractor(base, settings.backbone, settings.image_size).predict(raw, verbose=0)
    head = backbones.build_head(features.shape[1], 3, settings.dropout)
    training.compile_classifier(head, 0.01, params.train)
    head.fit(features, np.arange(6) % 3, epochs=2, verbose=0)

    exported = transfer.export_model(base, head, settings)
    from_raw = exported.predict(raw, verbose=0)
    np.testing.assert_allclose(from_raw, head.predict(features, verbose=0), atol=1e-5)

    path = saved.save_keras(exported, tmp_path, {"name": "xception_transfer", "classes": ["a", "b", "c"], "image_size": 71, "resize": "stretch"})
    reloaded = saved.load(path)
    np.testing.assert_allclose(reloaded.predict_proba(raw), from_raw, atol=1e-6)
    bigger = np.random.default_rng(1).integers(0, 256, (2, 120, 90, 3), dtype=np.uint8)
    assert reloaded.predict_proba(bigger).shape == (2, 3)  # any input size: resizing is inside


def test_fine_tune_trains_only_the_top_layers(base, settings, params, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    head = backbones.build_head(2048, 3, settings.dropout)
    model = transfer.export_model(base, head, settings)
    frozen_before = [w.numpy().copy() for w in base.weights[:4]]
    top = base.layers[-3]  # block14_sepconv2: the last layer with weights
    top_before = [w.numpy().copy() for w in top.weights]

    tuned = params.model_copy(update={
        "transfer": settings.model_copy(update={"fine_tune_epochs": 1, "fine_tune_layers": 3}),
        "train": params.train.model_copy(update={"batch_size": 4}),
    })
    split = split_on_disk(tmp_path / "images", images(8), np.arange(8) % 3)
    with tracking.stage_run("transfer", tuned, device.cpu_only()) as run:
        result = transfer.fine_tune(model, base, split, split, tuned, run)
    assert len(result.rows) == 1
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(frozen_before, base.weights[:4]))
    assert any(not np.array_equal(a, w.numpy()) for a, w in zip(top_before, top.weights))


def test_features_stream_in_record_order_with_labels_and_index(base, settings, tmp_path):
    from pipeline import imageset

    raw = images(7)
    split = split_on_disk(tmp_path / "images", raw, [0, 1, 2, 0, 1, 2, 0])
    extractor = backbones.feature_extractor(base, settings.backbone, settings.image_size)
    with imageset.SplitWriter(tmp_path, "train", (2048,), np.float32) as writer:
        backbones.extract_features(extractor, split, batch_size=3, writer=writer)
    stored = imageset.load_split(tmp_path, "train")
    np.testing.assert_allclose(
        np.concatenate([b["x"] for b in stored.batches(7)]), extractor.predict(raw, verbose=0), atol=1e-4
    )
    np.testing.assert_array_equal(stored.rows, split.rows)


def test_a_base_cut_at_a_block_pools_that_block_and_round_trips(settings, params, tmp_path):
    keras.utils.set_random_seed(0)
    full = backbones.base_model(settings.backbone, settings.image_size, None)
    cut = backbones.base_model(settings.backbone, settings.image_size, None, "block13")
    cut.set_weights(full.get_weights()[: len(cut.get_weights())])  # block 14's weights come last
    raw = images()
    features = backbones.feature_extractor(cut, settings.backbone, settings.image_size).predict(raw, verbose=0)
    assert features.shape == (6, 1024)  # block 13's 1024 channels, not block 14's 2048
    block13 = keras.Model(full.input, full.get_layer("block14_sepconv1").input)
    prepared = keras.applications.xception.preprocess_input(keras.ops.image.resize(raw.astype("float32"), (71, 71)))
    np.testing.assert_allclose(features, keras.ops.mean(block13(prepared), axis=(1, 2)), atol=1e-4)

    head = backbones.build_head(1024, 3, settings.dropout)
    exported = transfer.export_model(cut, head, settings)
    path = saved.save_keras(exported, tmp_path, {"name": "xception_transfer", "classes": ["a", "b", "c"], "image_size": 71, "resize": "stretch"})
    np.testing.assert_allclose(saved.load(path).predict_proba(raw), exported.predict(raw, verbose=0), atol=1e-6)
