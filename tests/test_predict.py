"""predict on real files with a real saved model: one JSON line per input, in order, bad files reported."""
import json
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


def test_command_line_exit_codes(model_path, good, bad):
    def run(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "pipeline.predict", *args]
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)

    done = run("--model", str(model_path), str(good[0]), str(bad[0]))
    assert done.returncode == 1, done.stderr
    results = lines(done.stdout)
    assert [r["path"] for r in results] == [str(good[0]), str(bad[0])]
    assert "label" in results[0] and "error" in results[1]

    missing = run("--model", str(model_path.with_name("nope.keras")), str(good[0]))
    assert missing.returncode == 2
    assert missing.stdout == ""
    assert missing.stderr.startswith("error: ") and "nope.keras" in missing.stderr
