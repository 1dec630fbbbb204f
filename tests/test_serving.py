"""The image-file pyfunc: in-process, and behind a real `mlflow models serve` over HTTP."""
import base64
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest

from pipeline import predict, serving
from pipeline.models import cnn, saved

from .conftest import SHARED, free_port, wait_for, write_image

CLASSES = ["paper", "rock", "scissors"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> saved.SavedModel:
    keras.utils.set_random_seed(0)
    network = cnn.build("cnn3v2", image_size=32, pixels_size=16, num_classes=len(CLASSES))
    meta = {"name": "tiny", "stage": "baselines", "dataset": "rps", "classes": CLASSES, "image_size": 32,
            "resize": "stretch", "min_size": 16}
    return saved.load(saved.save_keras(network, tmp_path_factory.mktemp("model"), meta))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    """Two real photos (the rps mirror's, when present), a PNG of another size, and a corrupt JPEG."""
    folder = tmp_path_factory.mktemp("photos")
    rps = SHARED / "datasets" / "rps"
    real = [min((rps / c).glob("*.jpg")) for c in ("rock", "paper")] if rps.is_dir() else [
        write_image(folder / "a.jpg", size=(300, 200), seed=1), write_image(folder / "b.jpg", size=(200, 300), seed=2)]
    corrupt = folder / "corrupt.jpg"
    corrupt.write_bytes(real[0].read_bytes()[:300])  # a JPEG cut inside its headers
    return [*real, write_image(folder / "c.png", size=(40, 60), seed=3, mode="RGBA"), corrupt]


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def test_rows_match_predict_and_bad_rows_say_why(model, photos, tmp_path):
    tiny = write_image(tmp_path / "tiny.png", size=(10, 40), seed=4)  # under the model's min_size 16
    frame = pd.DataFrame({serving.COLUMN: [b64(photos[0]), photos[2].read_bytes(), b64(photos[3]), "%%%", b64(tiny), b64(photos[1])]})
    rows = serving.predict_frame(model, frame, k=2).to_dict(orient="records")

    expected = list(predict.predict_files(model, [photos[0], photos[2], photos[3], photos[1]], k=2))
    for row, line in zip([rows[0], rows[1], rows[5]], [expected[0], expected[1], expected[3]]):
        assert row == {"label": line["label"], "probability": line["probability"], "top_k": line["top_k"], "error": None}
    assert rows[2]["error"] == expected[2]["error"] and rows[2]["error"].startswith("truncated")
    assert rows[3]["error"].startswith("not base64")
    assert rows[4]["error"] == "too small: 10x40, shorter side < min_size 16"  # as preprocess would quarantine it
    assert all(rows[i]["label"] is None and rows[i]["top_k"] is None for i in (2, 3, 4))


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as answer:
        return json.loads(answer.read())


def test_mlflow_models_serve_answers_photos_over_http(model, photos, workspace):
    uri = f"sqlite:///{workspace / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run():
        serving.log_model(model, photos[2].read_bytes(), registered_model_name="tiny-rps")
    mlflow.MlflowClient().set_registered_model_alias("tiny-rps", "champion", "1")
    logged = mlflow.pyfunc.load_model("models:/tiny-rps@champion")
    assert logged.metadata.signature == serving.SIGNATURE
    assert base64.b64decode(logged.input_example[serving.COLUMN][0]) == photos[2].read_bytes()

    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    mlflow_cli = str(Path(sys.executable).parent / "mlflow")
    server = subprocess.Popen(
        [mlflow_cli, "models", "serve", "-m", "models:/tiny-rps@champion", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        cwd=workspace, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", server)
        sent = [photos[0], photos[1], photos[3]]  # two real photos and a corrupt file, one batch
        split = post(f"http://127.0.0.1:{port}/invocations",
                     {"dataframe_split": {"columns": ["image"], "data": [[b64(p)] for p in sent]}, "params": {"top_k": 2}})
        inputs = post(f"http://127.0.0.1:{port}/invocations", {"inputs": {"image": [b64(photos[1])]}})
    finally:
        server.terminate()
        server.wait(timeout=30)

    expected = list(predict.predict_files(model, sent, k=2))
    answers = split["predictions"]
    for answer, line in zip(answers[:2], expected[:2]):
        assert (answer["label"], answer["top_k"], answer["error"]) == (line["label"], line["top_k"], None)
        np.testing.assert_allclose(answer["probability"], line["probability"])
    assert answers[2]["label"] is None and answers[2]["error"] == expected[2]["error"]
    [one] = inputs["predictions"]
    assert one["label"] == expected[1]["label"] and len(one["top_k"]) == serving.TOP_K
