"""The registry: one registered model per dataset; the champion alias moves only for a better model on the same test set."""
import base64
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd

from pipeline import device, registry, serving, tracking
from pipeline.models import saved

EXAMPLE = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)


def test_decide_champion_or_challenger():
    current = {"test_fingerprint": "abc", "val_accuracy": "0.8"}
    assert registry.decide(None, "abc", 0.1).alias == "champion"
    assert registry.decide(current, "abc", 0.81) == registry.Decision("champion", "val_accuracy 0.8100 beats the champion's 0.8000")
    assert registry.decide(current, "abc", 0.8) == registry.Decision("challenger", "val_accuracy 0.8000 does not beat the champion's 0.8000")
    moved = registry.decide(current, "other", 0.2)
    assert moved.alias == "champion" and "new lineage" in moved.reason


def tiny(dataset: str) -> saved.SavedModel:
    """A real saved Keras model (raw images of any size in), as evaluate registers it."""
    model = keras.Sequential([
        keras.Input((None, None, 3)), keras.layers.Rescaling(1 / 255), keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(2, activation="softmax"),
    ])
    meta = {"name": "cnn", "stage": "baselines", "dataset": dataset, "classes": ["a", "b"], "image_size": 16, "resize": "stretch"}
    directory = Path(dataset)
    directory.mkdir(exist_ok=True)
    return saved.load(saved.save_keras(model, directory, meta))


def test_versions_per_dataset_champion_moves_only_for_a_better_model(workspace, params):
    def evaluate(dataset: str, val: float, fingerprint: str = "same-test-set") -> tuple[str, str, registry.Decision]:
        row = {"val_accuracy": val, "test_accuracy": 0.5, "test_ci_low": 0.4, "test_ci_high": 0.6}
        with tracking.stage_run("evaluate", params, device.cpu_only()) as run:
            return registry.register(tiny(dataset), "image-classifier", row, fingerprint, run, EXAMPLE)

    assert evaluate("rps", 0.70)[:2] == ("image-classifier-rps", "1")
    assert evaluate("cats", 0.95)[:2] == ("image-classifier-cats", "1")  # another dataset: its own model
    _, version, decision = evaluate("rps", 0.60)  # worse: a challenger
    assert (version, decision.alias) == ("2", "challenger")
    assert evaluate("rps", 0.75)[1:] == ("3", registry.Decision("champion", "val_accuracy 0.7500 beats the champion's 0.7000"))
    assert evaluate("rps", 0.10, fingerprint="a-new-split")[2].alias == "champion"  # a new lineage

    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias("image-classifier-rps", "champion")
    assert str(champion.version) == "4" and champion.tags["test_fingerprint"] == "a-new-split"
    assert str(client.get_model_version_by_alias("image-classifier-rps", "challenger").version) == "2"
    cats = client.get_model_version_by_alias("image-classifier-cats", "champion")
    assert cats.tags["dataset"] == "cats" and cats.tags["val_accuracy"] == "0.95" and cats.tags["test_accuracy_ci"] == "0.4-0.6"
    # The version is the image-file pyfunc, its signature and input example (the PNG of EXAMPLE) logged.
    loaded = mlflow.pyfunc.load_model("models:/image-classifier-cats@champion")
    assert loaded.metadata.signature == serving.SIGNATURE
    example = loaded.input_example
    assert base64.b64decode(example[serving.COLUMN][0]) == serving.png_bytes(EXAMPLE)
    [answer] = loaded.predict(pd.DataFrame(example)).to_dict(orient="records")
    assert answer["label"] in ("a", "b") and answer["error"] is None
