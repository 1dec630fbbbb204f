"""The MLflow model registry: the champion logged as a Keras model, registered, and aliased."""
from __future__ import annotations

from typing import Any

from pipeline import device
from pipeline.models import saved
from pipeline.tracking import StageRun


def register(champion: saved.SavedModel, registered_name: str, row: dict[str, Any], run: StageRun) -> str:
    """Log the champion as an MLflow Keras model, register it, point the `champion` alias at it.

    The alias follows the latest evaluate run; the version's tags say which data and experiment it won on.
    """
    import mlflow

    with run.timed():
        info = mlflow.keras.log_model(
            champion.model,
            name="champion",
            registered_model_name=registered_name,
            # Explicit: inferring requirements would load the model again in a subprocess.
            pip_requirements=[
                f"keras=={device.package_version('keras')}",
                f"tensorflow=={device.package_version('tensorflow', 'tensorflow-cpu')}",
            ],
            metadata={"classes": champion.classes, "source": str(champion.path)},
        )
        version = str(info.registered_model_version)
        client = mlflow.MlflowClient()
        client.set_registered_model_alias(registered_name, "champion", version)
        tags = {
            "model": champion.name,
            "dataset": champion.meta["dataset"],
            "test_accuracy": str(row["test_accuracy"]),
            "dvc.exp_name": run.tags.get("dvc.exp_name", ""),
        }
        for key, value in tags.items():
            client.set_model_version_tag(registered_name, version, key, value)
    return version
