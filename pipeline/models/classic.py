"""scikit-learn baselines on downscaled pixels, saved with skops (no pickle).

skops.io stores the estimator as a schema of known types; loading refuses any type outside
TRUSTED, so a model file from elsewhere cannot run code the way an unpickled one can.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import UserError
from pipeline.imageset import Split

CLASSIC_BASELINES = ("random_forest", "logistic")
# Types skops reports as not trusted by default that our own estimators contain.
TRUSTED = ("sklearn.tree._tree.Tree",)


def pixels(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, size*size*3) in [0, 1], antialiased bilinear downscale.

    Pillow on float32 channels ("F" mode), not Keras: predicting with a scikit-learn model then never
    imports TensorFlow (seconds of start-up). It computes what keras.ops.image.resize(antialias=True) does,
    within 1e-5, a thousandth of a grey level (tests/test_models.py checks it).
    """
    from PIL import Image

    out = np.empty((len(images), size, size, 3), dtype=np.float32)
    for i, image in enumerate(images):
        wide = np.asarray(image, dtype=np.float32)
        for channel in range(3):
            plane = Image.fromarray(wide[..., channel], "F").resize((size, size), Image.Resampling.BILINEAR)
            out[i, ..., channel] = np.asarray(plane)
    out /= 255.0
    return out.reshape(len(images), -1)


def split_pixels(split: Split, size: int) -> np.ndarray:
    """pixels() of every image of a split on disk, read a batch at a time: only the small matrix is held."""
    out = np.empty((split.count, size * size * 3), dtype=np.float32)
    row = 0
    for batch in split.batches(256):
        out[row : row + len(batch)] = pixels(batch["x"], size)
        row += len(batch)
    return out


def estimator(name: str, seed: int, trees: int, max_leaf_nodes: int | None = None) -> Any:
    """An unfitted baseline. `max_leaf_nodes` caps each tree of the forest: grown to purity, a tree's node
    count grows with the training set, and with it the fit's memory and the .skops/.onnx exports."""
    if name == "random_forest":
        from sklearn.ensemble import RandomForestClassifier

        return RandomForestClassifier(n_estimators=trees, max_leaf_nodes=max_leaf_nodes, n_jobs=-1, random_state=seed)
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=1000, C=0.1, random_state=seed)


def save(model: Any, path: Path) -> None:
    import skops.io as sio

    sio.dump(model, path)


def export_onnx(model: Any, path: Path) -> None:
    """The fitted estimator as an ONNX graph (skl2onnx), probabilities as a plain tensor: what predict runs."""
    from skl2onnx import to_onnx

    graph = to_onnx(model, np.zeros((1, model.n_features_in_), np.float32), options={id(model): {"zipmap": False}})
    path.write_bytes(graph.SerializeToString())


class OnnxEstimator:
    """An estimator's ONNX export run by onnxruntime: scikit-learn's probabilities (to ~1e-6) after a 0.2 s
    import, where importing scikit-learn (and skops) takes 1.5-2.5 s of a one-photo predict here. A graph of
    standard operators, so loading it runs no code of the file's."""

    def __init__(self, path: Path) -> None:
        import onnxruntime

        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            features, probabilities = self.session.get_inputs()[0], self.session.get_outputs()[1]
        except Exception as exc:  # noqa: BLE001 - a damaged or foreign file: say which one
            raise UserError(f"{path}: cannot load the ONNX model ({type(exc).__name__}: {exc})") from None
        self._input = features.name
        self.n_features_in_ = features.shape[1]
        self.output_shape = (None, probabilities.shape[1])

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(["probabilities"], {self._input: np.asarray(x, np.float32)})[0].astype(np.float64)


def load_for_inference(path: Path) -> Any:
    """The ONNX export saved beside a .skops model when there is one (fast, no scikit-learn), else the estimator."""
    exported = path.with_suffix(".onnx")
    return OnnxEstimator(exported) if exported.is_file() else load(path)


def load(path: Path) -> Any:
    import skops.io as sio

    try:
        untrusted = sio.get_untrusted_types(file=path)
        unexpected = sorted(set(untrusted) - set(TRUSTED))
        if not unexpected:
            return sio.load(path, trusted=untrusted)
    except Exception as exc:  # noqa: BLE001 - not a skops archive (a pickle renamed), or a damaged one
        raise UserError(f"{path}: cannot load the skops model ({type(exc).__name__}: {exc})") from None
    raise UserError(f"{path} holds types this pipeline never saves ({', '.join(unexpected)}); refusing to load it")
