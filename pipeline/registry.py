"""The MLflow model registry: one registered model per dataset, champion and challenger.

Each version is the pyfunc of pipeline/serving.py: it takes image files (base64) and answers labels, so
`mlflow models serve -m models:/<name>@champion` serves photos over HTTP.

Every evaluate run registers its best Keras model (by validation) as a new version of
`<evaluate.registered_model>-<dataset>`. The `champion` alias moves to it only when it beats the current
champion by the selection score on the same test set (same fingerprint); otherwise it becomes the
`challenger`. A version scored on another test set starts a new lineage and takes the champion alias.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.models import saved
from pipeline.tracking import StageRun

SELECTION_SCORE = "val_accuracy"


def registered_name(base: str, dataset: str) -> str:
    """A cats/dogs model must never be served as the digits champion: one registered model per dataset."""
    return f"{base}-{dataset}"


@dataclass(frozen=True)
class Decision:
    alias: str  # "champion" or "challenger"
    reason: str


def decide(current: dict[str, str] | None, fingerprint: str, score: float) -> Decision:
    """Where a new version goes, given the current champion's version tags (None: there is none)."""
    if current is None:
        return Decision("champion", "the first version of this registered model")
    if current.get("test_fingerprint") != fingerprint:
        return Decision("champion", "the test set changed: a new lineage starts here")
    best = float(current[SELECTION_SCORE])
    if score > best:
        return Decision("champion", f"{SELECTION_SCORE} {score:.4f} beats the champion's {best:.4f}")
    return Decision("challenger", f"{SELECTION_SCORE} {score:.4f} does not beat the champion's {best:.4f}")


def _champion_tags(client: Any, name: str) -> dict[str, str] | None:
    from mlflow.exceptions import MlflowException

    try:
        return dict(client.get_model_version_by_alias(name, "champion").tags)
    except MlflowException:  # no such model yet, or no champion alias
        return None


def register(
    best: saved.SavedModel, registered_model: str, row: dict[str, Any], fingerprint: str, run: StageRun,
    example: np.ndarray,
) -> tuple[str, str, Decision]:
    """Log `best` as the image-file pyfunc (serving.py; `example`, an RGB image, is its input example as a PNG file),
    register it under its dataset's name, alias it; return (registered name, version, decision). Its version
    tags say what it scored, on which data, in which run."""
    import mlflow

    name = registered_name(registered_model, best.meta["dataset"])
    with run.timed():
        # Imported in the tracking work: the served model lives in MLflow's store, not in a DVC output.
        from pipeline import serving

        client = mlflow.MlflowClient()
        decision = decide(_champion_tags(client, name), fingerprint, row[SELECTION_SCORE])
        info = serving.log_model(
            best, serving.png_bytes(example), name="champion", registered_model_name=name,
            metadata={"classes": best.classes, "source": str(best.path)},
        )
        version = str(info.registered_model_version)
        tags = {
            "model": best.name,
            "dataset": best.meta["dataset"],
            SELECTION_SCORE: str(row[SELECTION_SCORE]),
            "test_accuracy": str(row["test_accuracy"]),
            "test_accuracy_ci": f"{row['test_ci_low']}-{row['test_ci_high']}",
            "test_fingerprint": fingerprint,
            "dvc.exp_name": run.tags.get("dvc.exp_name", ""),
        }
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
        client.set_registered_model_alias(name, decision.alias, version)
    return name, version, decision
