"""Model builders and saved models: raw uint8 images of any size in, safe round trips on disk."""
import json
import os
import pickle

import keras
import numpy as np
import pytest
import skops.io as sio
from sklearn.preprocessing import FunctionTransformer

from pipeline.errors import UserError
from pipeline.models import backbones, classic, cnn, saved

CLASSES = ["a", "b", "c"]


def uint8_images(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def keras_meta(name: str) -> dict:
    return {"name": name, "stage": "baselines", "classes": CLASSES, "image_size": 32, "resize": "stretch"}


@pytest.mark.parametrize("name", cnn.KERAS_BASELINES)
def test_keras_baselines_take_any_image_size(name):
    model = cnn.build(name, image_size=32, pixels_size=16, num_classes=3)
    # 40x50, neither the image size nor the pixels size: the Resizing layer inside must adapt it.
    probabilities = model.predict(uint8_images(2, 40, 50), verbose=0)
    assert probabilities.shape == (2, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_normalize_off_feeds_raw_pixel_values():
    scaled = cnn.build("mlp", image_size=32, pixels_size=8, num_classes=3)
    raw = cnn.build("mlp", image_size=32, pixels_size=8, num_classes=3, normalize=False)
    assert "rescale" in [layer.name for layer in scaled.layers]
    assert "rescale" not in [layer.name for layer in raw.layers]


def test_save_keras_round_trip_loads_in_safe_mode(tmp_path):
    model = cnn.build("cnn3v2", image_size=32, pixels_size=16, num_classes=3)
    images = uint8_images(4, 30, 45)
    meta = {**keras_meta("cnn3v2"), "kept_epoch": 3, "hyperparameters": {"filters": 16}}  # extra keys pass through
    path = saved.save_keras(model, tmp_path, meta)

    assert path == tmp_path / "cnn3v2.keras"
    assert saved.meta_path(path).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn3v2.json", "cnn3v2.keras"]  # no temp files left
    loaded = saved.load(path)
    assert loaded.is_keras
    assert loaded.classes == CLASSES
    assert loaded.meta == {**meta, "file": "cnn3v2.keras"}
    np.testing.assert_allclose(loaded.predict_proba(images), model.predict(images, verbose=0), rtol=1e-6, atol=1e-7)


def test_backbone_feature_extractor_round_trip(tmp_path):
    base = backbones.base_model("xception", 71, None)  # random weights: nothing downloaded
    extractor = backbones.feature_extractor(base, "xception", 71)
    inputs = keras.Input(shape=(None, None, 3), name="image")
    model = keras.Model(inputs, extractor(inputs))  # nested, as the transfer export holds it
    images = uint8_images(2, 60, 90)

    features = model.predict(images, verbose=0)
    assert features.shape == (2, 2048)
    assert np.ptp(features) > 0  # random weights still give varied features: the comparison below means something
    model.save(tmp_path / "features.keras")
    # safe_mode=True only works because BackbonePreprocess is a registered serializable, not a Lambda.
    reloaded = keras.saving.load_model(tmp_path / "features.keras", safe_mode=True)
    np.testing.assert_allclose(reloaded.predict(images, verbose=0), features, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", classic.CLASSIC_BASELINES)
def test_classic_round_trip(tmp_path, name):
    images = uint8_images(12, 20, 24)
    labels = np.arange(12) % 3
    features = classic.pixels(images, 8)
    assert features.shape == (12, 8 * 8 * 3)
    assert features.dtype == np.float32 and 0 <= features.min() and features.max() <= 1
    estimator = classic.estimator(name, seed=0, trees=5).fit(features, labels)

    path = saved.save_classic(estimator, tmp_path, {**keras_meta(name), "pixels_size": 8})
    loaded = saved.load(path)
    assert path.suffix == ".skops" and not loaded.is_keras
    assert loaded.classes == CLASSES
    # Loaded for prediction from its ONNX export (no scikit-learn), the estimator's own probabilities.
    assert isinstance(loaded.model, classic.OnnxEstimator)
    np.testing.assert_allclose(loaded.predict_proba(images), estimator.predict_proba(features), rtol=0, atol=1e-6)
    path.with_suffix(".onnx").unlink()  # a model saved before the export: the estimator itself
    np.testing.assert_array_equal(saved.load(path).predict_proba(images), estimator.predict_proba(features))


def test_a_damaged_onnx_export_is_one_clear_error(tmp_path):
    estimator = classic.estimator("logistic", seed=0, trees=1).fit(classic.pixels(uint8_images(6, 16, 16), 8), np.arange(6) % 3)
    path = saved.save_classic(estimator, tmp_path, {**keras_meta("logistic"), "pixels_size": 8})
    path.with_suffix(".onnx").write_bytes(b"not a graph")
    with pytest.raises(UserError, match=r"logistic\.onnx: cannot load the ONNX model"):
        saved.load(path)


@pytest.mark.parametrize("height, width, size", [(128, 128, 32), (299, 299, 32), (40, 50, 48), (20, 20, 32)])
def test_classic_pixels_are_keras_antialiased_resize(height, width, size):
    """Pillow computes the features without TensorFlow: the same as Keras' antialiased resize (which
    the scikit-learn models were first trained on), down- and upscaling, within float32 round-off."""
    images = uint8_images(4, height, width)
    expected = keras.ops.convert_to_numpy(
        keras.ops.image.resize(images.astype(np.float32), (size, size), antialias=True)
    ).reshape(4, -1) / 255.0
    np.testing.assert_allclose(classic.pixels(images, size), expected, rtol=0, atol=1e-5)


def test_classic_load_refuses_untrusted_types(tmp_path):
    # FunctionTransformer(numpy.log1p) would not do: skops trusts numpy ufuncs by default, so the
    # file reports no untrusted type. os.system is exactly what a hostile model file would carry.
    path = tmp_path / "hostile.skops"
    sio.dump(FunctionTransformer(os.system), path)
    untrusted = sio.get_untrusted_types(file=path)
    assert untrusted == [f"{os.system.__module__}.system"]

    with pytest.raises(UserError, match="refusing to load") as raised:
        classic.load(path)
    assert untrusted[0] in str(raised.value)


def test_load_rejects_what_is_not_a_saved_model(tmp_path):
    with pytest.raises(UserError, match="not a saved model"):
        saved.load(tmp_path / "missing.keras")

    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(UserError, match="not a saved model"):
        saved.load(text)

    model = tmp_path / "orphan.keras"
    model.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(UserError, match=r"orphan\.json is missing"):
        saved.load(model)

    # With its .json, a damaged file gets a one-line user error rather than a Keras traceback.
    saved.meta_path(model).write_text(json.dumps(keras_meta("orphan")))
    with pytest.raises(UserError, match="orphan.keras: cannot load the Keras model"):
        saved.load(model)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"name": "x", "classes": ', "Invalid JSON: EOF while parsing"),
        ("[1, 2]", "Input should be an object (got [1, 2])"),
        ("{}", "name: required key is missing; classes: required key is missing; image_size: required"),
        ({"image_size": 100_000}, "image_size: Input should be less than or equal to 1024 (got 100000)"),
        ({"image_size": 4}, "image_size: Input should be greater than or equal to 8 (got 4)"),
        ({"image_size": "32"}, "image_size: Input should be a valid integer (got '32')"),
        ({"classes": ["a"]}, "classes: List should have at least 2 items"),
        ({"classes": ["a", "a"]}, "classes: names a class twice (got ['a', 'a'])"),
        ({"classes": ["a", ""]}, "classes.1: String should have at least 1 character"),
        ({"classes": ["a", 2]}, "classes.1: Input should be a valid string"),
        ({"resize": "zoom"}, "resize: Input should be 'stretch', 'pad' or 'center_crop' (got 'zoom')"),
        ({"name": ""}, "name: String should have at least 1 character"),
    ],
    ids=["malformed", "not-a-mapping", "empty", "huge-size", "tiny-size", "size-as-text", "one-class",
         "twice", "blank-class", "number-class", "resize", "blank-name"],
)
def test_metadata_is_validated_with_the_file_and_key_in_one_line(tmp_path, content, message):
    """Checked before the model file is even opened: a bad .json never reaches Keras or predict's decoder."""
    path = tmp_path / "x.keras"
    path.write_bytes(b"never read")
    text = content if isinstance(content, str) else json.dumps({**keras_meta("x"), **content})
    saved.meta_path(path).write_text(text)
    with pytest.raises(UserError) as raised:
        saved.load(path)
    assert str(raised.value).startswith(f"{tmp_path / 'x.json'}: {message}")
    assert "\n" not in str(raised.value)


def test_skops_metadata_needs_pixels_size(tmp_path):
    path = tmp_path / "x.skops"
    path.write_bytes(b"never read")
    saved.meta_path(path).write_text(json.dumps(keras_meta("x")))
    with pytest.raises(UserError, match="x.json: pixels_size: required key is missing"):
        saved.load(path)
    saved.meta_path(path).write_text(json.dumps({**keras_meta("x"), "pixels_size": 2}))
    with pytest.raises(UserError, match="x.json: pixels_size: Input should be greater than or equal to 4"):
        saved.load(path)


@pytest.mark.parametrize("suffix, kind", [(".skops", "skops"), (".keras", "Keras")])
def test_a_pickle_renamed_as_a_model_is_refused_naming_the_file(tmp_path, suffix, kind):
    path = tmp_path / f"renamed{suffix}"
    path.write_bytes(pickle.dumps(FunctionTransformer(os.system)))  # never unpickled, so never run
    saved.meta_path(path).write_text(json.dumps({**keras_meta("renamed"), "pixels_size": 8}))
    with pytest.raises(UserError, match=f"renamed\\{suffix}: cannot load the {kind} model"):
        saved.load(path)


def test_metadata_must_fit_the_model_it_describes(tmp_path):
    """A .json from another model: too few class names would index past the outputs, a wrong pixels_size
    would feed the estimator the wrong number of features."""
    images = uint8_images(12, 20, 24)
    estimator = classic.estimator("logistic", seed=0, trees=1).fit(classic.pixels(images, 8), np.arange(12) % 3)
    path = saved.save_classic(estimator, tmp_path, {**keras_meta("logistic"), "pixels_size": 8})
    for change, message in [
        ({"classes": ["a", "b"]}, "logistic.json does not fit logistic.skops: classes: names 2 classes, the model"),
        ({"pixels_size": 9}, "logistic.json does not fit logistic.skops: pixels_size: 9 does not make the 192"),
    ]:
        saved.meta_path(path).write_text(json.dumps({**keras_meta("logistic"), "pixels_size": 8, **change}))
        with pytest.raises(UserError, match=message):
            saved.load(path)

    model = cnn.build("mlp", image_size=32, pixels_size=8, num_classes=3)
    keras_path = saved.save_keras(model, tmp_path, {**keras_meta("mlp"), "classes": ["a", "b", "c", "d"]})
    with pytest.raises(UserError, match="mlp.json does not fit mlp.keras: classes: names 4 classes, the model predicts"):
        saved.load(keras_path)
