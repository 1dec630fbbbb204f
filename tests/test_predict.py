"""predict on real files with a real saved model: one JSON line per input, in order, bad files reported."""
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from pipeline import predict
from pipeline.images import load_array
from pipeline.models import cnn, saved

from .conftest import REPO, write_image

CLASSES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    keras.utils.set_random_seed(0)
    model = cnn.build("cnn3v2", image_size=32, pixels_size=16, num_classes=len(CLASSES))
    meta = {"name": "tiny", "stage": "baselines", "classes": CLASSES, "image_size": 32, "resize": "stretch"}
    return saved.save_keras(model, tmp_path_factory.mktemp("model"), meta)


@pytest.fixture
def good(tmp_path) -> list[Path]:
    """Different sizes and modes, all of which predict must bring to RGB at the model's size."""
    return [
        write_image(tmp_path / "photo.jpg", size=(64, 48), seed=1),
        write_image(tmp_path / "alpha.png", size=(40, 30), seed=2, mode="RGBA"),
        write_image(tmp_path / "gray.png", size=(20, 50), seed=3, mode="L"),
    ]


@pytest.fixture
def bad(tmp_path) -> list[Path]:
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    empty = tmp_path / "empty.jpg"
    empty.touch()
    return [text, empty, tmp_path / "missing.jpg"]


def lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def expected(model_path: Path, files: list[Path]) -> np.ndarray:
    """What the model says about `files`, decoded by the same code preprocess uses."""
    model = saved.load(model_path)
    arrays = [load_array(f, size=32, resize="stretch", max_pixels=predict.MAX_PIXELS) for f in files]
    return model.model.predict(np.stack(arrays), verbose=0)


def test_main_reports_every_file_in_order(model_path, good, bad, capsys):
    files = [good[0], bad[0], good[1], bad[1], good[2], bad[2]]
    assert predict.main(["--model", str(model_path), "--top-k", "2", *map(str, files)]) == 1

    results = lines(capsys.readouterr().out)
    assert [r["path"] for r in results] == [str(f) for f in files]
    for result in results[0::2]:
        ranked = result["top_k"]
        assert len(ranked) == 2
        assert result["label"] in CLASSES and result["label"] == ranked[0]["label"]
        assert result["probability"] == ranked[0]["probability"]
        assert ranked[0]["probability"] >= ranked[1]["probability"]
        assert "error" not in result
    failures = results[1::2]
    assert all("label" not in r for r in failures)
    assert failures[0]["error"].startswith("not an image")
    assert failures[1]["error"].startswith("empty file")
    assert failures[2]["error"].startswith("cannot read")


def test_main_matches_the_model_on_the_same_pixels(model_path, good, capsys):
    assert predict.main(["--model", str(model_path), *map(str, good)]) == 0

    results = lines(capsys.readouterr().out)
    probabilities = expected(model_path, good)
    assert [r["label"] for r in results] == [CLASSES[i] for i in probabilities.argmax(axis=1)]
    for result, row in zip(results, probabilities):
        assert len(result["top_k"]) == 3  # the default
        by_label = {entry["label"]: entry["probability"] for entry in result["top_k"]}
        np.testing.assert_allclose([by_label[c] for c in CLASSES], row, atol=2e-6)  # JSON keeps 6 decimals


def test_directories_are_walked_recursively_in_name_order(model_path, tmp_path, capsys):
    folder = tmp_path / "in"
    files = [
        write_image(folder / "a" / "c.png", seed=1),
        write_image(folder / "b.jpg", seed=2),
        write_image(folder / "c" / "a.png", seed=3),
    ]
    assert predict.main(["--model", str(model_path), str(folder)]) == 0
    assert [r["path"] for r in lines(capsys.readouterr().out)] == [str(f) for f in files]


def test_predict_files_keeps_input_order_across_batches(model_path, good, bad):
    # batch_size=2 splits these into [good, bad], [bad, bad], [good]: a batch with nothing to
    # predict, and a last partial batch that only the final flush emits.
    files = [good[0], bad[0], bad[1], bad[2], good[1]]
    results = list(predict.predict_files(saved.load(model_path), files, k=3, batch_size=2))

    assert [r["path"] for r in results] == [str(f) for f in files]
    assert ["error" in r for r in results] == [False, True, True, True, False]
    probabilities = expected(model_path, [good[0], good[1]])
    for result, row in zip([results[0], results[4]], probabilities):
        by_label = {entry["label"]: entry["probability"] for entry in result["top_k"]}
        np.testing.assert_allclose([by_label[c] for c in CLASSES], row, atol=2e-6)


def run(*args: str) -> subprocess.CompletedProcess:
    """The CLI in its own process: a read that blocks (a FIFO, /dev/zero) fails the test instead of hanging it."""
    command = [sys.executable, "-m", "pipeline.predict", *args]
    return subprocess.run(command, check=False, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_command_line_exit_codes(model_path, good, bad):
    done = run("--model", str(model_path), str(good[0]), str(bad[0]))
    assert done.returncode == 1, done.stderr
    results = lines(done.stdout)
    assert [r["path"] for r in results] == [str(good[0]), str(bad[0])]
    assert "label" in results[0] and "error" in results[1]

    missing = run("--model", str(model_path.with_name("nope.keras")), str(good[0]))
    assert missing.returncode == 2
    assert missing.stdout == ""
    assert missing.stderr.startswith("error: ") and "nope.keras" in missing.stderr


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"), reason="needs FIFOs and /dev/zero")
def test_only_regular_files_are_read_the_others_get_an_error_line(model_path, tmp_path):
    folder = tmp_path / "in"
    photo = write_image(folder / "a.png", seed=1)
    os.mkfifo(folder / "b.jpg")  # nobody writes to it: opening it for reading would wait forever
    (folder / "c.jpg").symlink_to("/dev/zero")  # would never reach end of file
    only_odd = tmp_path / "odd"
    only_odd.mkdir()
    os.mkfifo(only_odd / "pipe.png")
    fifo, zero = tmp_path / "given.jpg", tmp_path / "zero.png"
    os.mkfifo(fifo)
    zero.symlink_to("/dev/zero")

    done = run("--model", str(model_path), str(folder), str(only_odd), str(fifo), str(zero))
    assert done.returncode == 1, done.stderr
    results = lines(done.stdout)
    paths = [photo, folder / "b.jpg", folder / "c.jpg", only_odd / "pipe.png", fifo, zero]
    assert [r["path"] for r in results] == list(map(str, paths))
    assert "label" in results[0]
    kinds = ["fifo", "character device", "fifo", "fifo", "character device"]
    assert [r["error"] for r in results[1:]] == [f"not a regular file ({kind})" for kind in kinds]
    assert "no image files" not in done.stderr  # a folder of odd files is not empty: its lines say why


def test_an_empty_directory_is_an_error_not_a_silent_success(model_path, good, tmp_path, capsys):
    empty, nested = tmp_path / "empty", tmp_path / "nested"
    empty.mkdir()
    (nested / "sub" / "deeper").mkdir(parents=True)  # folders only: still nothing to read
    assert predict.main(["--model", str(model_path), str(empty), str(good[0]), str(nested)]) == 1

    out, err = capsys.readouterr()
    assert [r["path"] for r in lines(out)] == [str(good[0])]
    assert err.splitlines() == [f"error: no image files under {empty}", f"error: no image files under {nested}"]


@pytest.fixture
def unusable_models(model_path, tmp_path) -> dict[str, Path]:
    """A real Keras model whose .json says image_size 100000, and a pickle renamed .skops with a valid .json."""
    huge = shutil.copy(model_path, tmp_path / "huge.keras")
    meta = json.loads(saved.meta_path(model_path).read_text())
    saved.meta_path(Path(huge)).write_text(json.dumps({**meta, "image_size": 100_000}))
    pickled = tmp_path / "pickled.skops"
    pickled.write_bytes(pickle.dumps({"not": "a model"}))
    saved.meta_path(pickled).write_text(json.dumps({**meta, "pixels_size": 8}))
    return {"image_size": Path(huge), "pickled": pickled}


def test_a_model_that_cannot_be_used_exits_2_with_one_line(unusable_models, good):
    for model, expected in [
        (unusable_models["image_size"], "huge.json: image_size: Input should be less than or equal to 1024"),
        (unusable_models["pickled"], "pickled.skops: cannot load the skops model (BadZipFile"),
    ]:
        done = run("--model", str(model), str(good[0]))
        assert done.returncode == 2, done.stderr
        assert done.stdout == ""
        assert done.stderr.startswith("error: ") and expected in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1  # no traceback


def test_a_scikit_learn_model_predicts_without_importing_tensorflow_or_scikit_learn(tmp_path, good):
    """TensorFlow's import alone costs seconds, scikit-learn's 1-2 s: predict with a .skops model runs its ONNX
    export and pays neither."""
    from pipeline.models import classic

    images = np.stack([load_array(f, size=32, resize="stretch", max_pixels=predict.MAX_PIXELS) for f in good])
    estimator = classic.estimator("logistic", seed=0, trees=1).fit(classic.pixels(images, 8), [0, 1, 2])
    meta = {"name": "logistic", "stage": "baselines", "classes": CLASSES, "image_size": 32, "resize": "stretch", "pixels_size": 8}
    path = saved.save_classic(estimator, tmp_path, meta)

    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "pipeline.predict", "--model", str(path), *map(str, good)],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [r["label"] for r in lines(done.stdout)] == [CLASSES[i] for i in estimator.predict(classic.pixels(images, 8))]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "onnxruntime" in imported and not imported & {"sklearn", "skops", "tensorflow", "keras"}
