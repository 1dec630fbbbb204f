"""A saved model as an MLflow pyfunc that takes image files: what `mlflow models serve` answers over HTTP.

Input: a DataFrame (over HTTP: JSON `dataframe_split`, `dataframe_records` or `inputs`) with a column `image`
holding each file's bytes base64-encoded (raw bytes are accepted in-process): JPEG, PNG, ..., any size,
decoded and checked as preprocess did (pipeline.predict.decode: EXIF, modes, resize). Output: one row per
image with `label`, `probability`, `top_k` (label/probability pairs; the `top_k` param, default 3) and
`error`, the reason a file cannot be used (the quarantine reason, or not base64): a bad image spoils its own
row, never the batch.

Logged as a "model from code": MLflow runs this file to load the model and nothing is pickled. The saved
model and its .json travel as artifacts; the `pipeline` package must be importable where it is served (the
project's environment: `mlflow models serve --env-manager local`).
"""
from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types.schema import (
    Array,
    ColSpec,
    Object,
    ParamSchema,
    ParamSpec,
    Property,
    Schema,
)
from PIL import Image

from pipeline import device, predict
from pipeline.images import BadImage
from pipeline.models import saved

COLUMN = "image"
TOP_K = 3
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", COLUMN)]),
    outputs=Schema([
        ColSpec("string", "label", required=False),
        ColSpec("double", "probability", required=False),
        ColSpec(Array(Object([Property("label", "string"), Property("probability", "double")])), "top_k", required=False),
        ColSpec("string", "error", required=False),
    ]),
    params=ParamSchema([ParamSpec("top_k", "long", TOP_K)]),
)


def file_bytes(cell: Any) -> bytes | BadImage:
    """A cell of the `image` column as the file's bytes (a BadImage saying why not, for that row's error)."""
    if isinstance(cell, (bytes, bytearray, memoryview)):
        return bytes(cell)
    if not isinstance(cell, str):
        return BadImage(f"not an image file: expected base64 text, got {type(cell).__name__}")
    try:
        return base64.b64decode(cell, validate=True)
    except (binascii.Error, ValueError) as exc:
        return BadImage(f"not base64: {exc}")


def predict_frame(model: saved.SavedModel, frame: pd.DataFrame, k: int = TOP_K) -> pd.DataFrame:
    """The rows' images -> label, probability, top_k, error (None where it does not apply), in row order."""
    results = predict.predict_sources(model, ((i, file_bytes(cell)) for i, cell in enumerate(frame[COLUMN])), k)
    rows = [{"label": None, "probability": None, "top_k": None, "error": None, **result} for _, result in results]
    return pd.DataFrame(rows, columns=["label", "probability", "top_k", "error"], dtype=object)


def png_bytes(image: np.ndarray) -> bytes:
    """An RGB uint8 array as a PNG file: an input example from a test record."""
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def requirements(model: saved.SavedModel) -> list[str]:
    """Pinned explicitly: inferring them would load the model again in a subprocess."""
    pins = [f"pillow=={device.package_version('pillow')}", f"pydantic=={device.package_version('pydantic')}"]
    if model.is_keras:
        return [*pins, f"keras=={device.package_version('keras')}",
                f"tensorflow=={device.package_version('tensorflow', 'tensorflow-cpu')}"]
    return [*pins, f"scikit-learn=={device.package_version('scikit-learn')}", f"skops=={device.package_version('skops')}",
            f"onnxruntime=={device.package_version('onnxruntime')}"]


def artifacts(model: saved.SavedModel) -> dict[str, str]:
    """The files saved.load reads: the model, its .json, and a scikit-learn model's ONNX export."""
    files = {"model": str(model.path), "meta": str(saved.meta_path(model.path))}
    exported = model.path.with_suffix(".onnx")
    return files | ({"onnx": str(exported)} if exported.is_file() else {})


def log_model(model: saved.SavedModel, example: bytes, name: str = "model", **kwargs: Any) -> Any:
    """Log `model` (its file and .json) as this pyfunc, with the signature and `example` (an image file's
    bytes) as the input example; kwargs go to mlflow.pyfunc.log_model (registered_model_name, metadata)."""
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=__file__,
        artifacts=artifacts(model),
        signature=SIGNATURE,
        input_example=pd.DataFrame({COLUMN: [base64.b64encode(example).decode("ascii")]}),
        pip_requirements=requirements(model),
        **kwargs,
    )


class ImageClassifier(PythonModel):
    def load_context(self, context: Any) -> None:
        # The artifacts land side by side: <name>.keras|.skops beside <name>.json, as saved.load expects.
        self.model = saved.load(Path(context.artifacts["model"]))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        k = int((params or {}).get("top_k", TOP_K))
        if k < 1:
            raise ValueError(f"top_k must be at least 1 (got {k})")
        return predict_frame(self.model, model_input, k)


mlflow.models.set_model(ImageClassifier())
