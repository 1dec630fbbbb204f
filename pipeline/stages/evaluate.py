"""evaluate stage: every saved model on the same test split -> leaderboard, reports, the champion.

Per model: accuracy, top-k (more than k classes only), macro precision/recall/F1, a per-class
report, a confusion matrix (PNG, and rows for DVC's confusion plot), the most confused class
pairs with test thumbnails, inference ms/image and file size. The best Keras model becomes
data/models/champion.keras and the `champion` alias of the registered model in MLflow.
"""
from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pipeline import cli, device, fsio, imageset, paths, tracking
from pipeline.errors import UserError
from pipeline.imageset import Split
from pipeline.models import saved
from pipeline.params import EvaluateParams, load_params
from pipeline.tracking import StageRun
from pipeline.training import scores

log = logging.getLogger("evaluate")
MODEL_DIRS = (paths.BASELINE_MODELS, paths.TUNED_MODELS, paths.TRANSFER_MODELS)
THUMB = 64


def timed_probabilities(model: saved.SavedModel, images: np.ndarray) -> tuple[np.ndarray, float]:
    """Class probabilities and inference ms/image, after a warm-up batch (graph tracing is not inference)."""
    model.predict_proba(images[:1])
    start = time.perf_counter()
    probabilities = model.predict_proba(images)
    return probabilities, 1000 * (time.perf_counter() - start) / len(images)


def confused_pairs(matrix: np.ndarray, count: int) -> list[tuple[int, int, int]]:
    """(true, predicted, how many) for the largest off-diagonal cells, largest first."""
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:count]
    cells = [(*np.unravel_index(i, off.shape), off.flat[i]) for i in order]
    return [(int(t), int(p), int(n)) for t, p, n in cells if n > 0]


def model_scores(labels: np.ndarray, probabilities: np.ndarray, classes: Sequence[str], top_k: int) -> dict[str, float]:
    from sklearn.metrics import top_k_accuracy_score

    found = scores(labels, probabilities, "test_")
    if len(classes) > top_k:
        found[f"test_top{top_k}_accuracy"] = round(
            float(top_k_accuracy_score(labels, probabilities, k=top_k, labels=np.arange(len(classes)))), 4
        )
    return found


def confusion_png(matrix: np.ndarray, classes: Sequence[str], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    labelled = len(classes) <= 30  # 120 breed names on an axis are unreadable: show the colours only
    side = max(4.0, min(0.3 * len(classes), 24.0))
    figure, axes = plt.subplots(figsize=(side + 1, side))
    display = ConfusionMatrixDisplay(matrix, display_labels=list(classes) if labelled else None)
    display.plot(ax=axes, include_values=labelled, xticks_rotation="vertical", colorbar=False)
    axes.set_title(title)
    figure.tight_layout()
    with fsio.atomic_file(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)


def pairs_png(
    pairs: Sequence[tuple[int, int, int]], test: Split, predicted: np.ndarray, classes: Sequence[str], per_pair: int
) -> Image.Image:
    """A row per confused pair: its caption, then test images of that class predicted as the other."""
    label_width = 220
    rows = max(len(pairs), 1)
    sheet = Image.new("RGB", (label_width + per_pair * THUMB, rows * THUMB), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for row, (true, wrong, count) in enumerate(pairs):
        draw.text((4, row * THUMB + 4), f"{classes[true]}\n-> {classes[wrong]}\n({count} images)", fill=(0, 0, 0))
        examples = np.flatnonzero((test.labels == true) & (predicted == wrong))[:per_pair]
        for column, index in enumerate(examples):
            thumb = Image.fromarray(np.asarray(test.images[index])).resize((THUMB, THUMB))
            sheet.paste(thumb, (label_width + column * THUMB, row * THUMB))
    return sheet


def evaluate_model(
    model: saved.SavedModel,
    test: Split,
    classes: Sequence[str],
    settings: EvaluateParams,
    reports: Path,
    predictions: Path,
    run: StageRun,
) -> dict[str, Any]:
    """Score one model, write its reports under `reports`/<model> and its DVC confusion rows; return its row."""
    from sklearn.metrics import classification_report, confusion_matrix

    probabilities, ms_per_image = timed_probabilities(model, test.images)
    predicted = probabilities.argmax(axis=1)
    everything = np.arange(len(classes))
    matrix = confusion_matrix(test.labels, predicted, labels=everything)
    pairs = confused_pairs(matrix, settings.confused_pairs)
    row = {
        "model": model.name,
        "stage": model.meta["stage"],
        **model_scores(test.labels, probabilities, classes, settings.top_k),
        "inference_ms_per_image": round(ms_per_image, 3),
        "size_bytes": model.path.stat().st_size,
        "file": str(model.path),
    }
    report = classification_report(
        test.labels, predicted, labels=everything, target_names=list(classes), output_dict=True, zero_division=0
    )
    folder = reports / model.name
    folder.mkdir()
    fsio.write_json(folder / "report.json", {
        "scores": row,
        "per_class": report,
        "confused_pairs": [{"true": classes[t], "predicted": classes[p], "count": n} for t, p, n in pairs],
    })
    confusion_png(matrix, classes, f"{model.name}: test accuracy {row['test_accuracy']:.3f}", folder / "confusion.png")
    with fsio.atomic_file(folder / "confused_pairs.png") as tmp:
        pairs_png(pairs, test, predicted, classes, per_pair=4).save(tmp, format="PNG")
    fsio.write_json(
        predictions / f"{model.name}.json",
        [{"actual": classes[t], "predicted": classes[p]} for t, p in zip(test.labels, predicted)],
    )
    for name in ("report.json", "confusion.png", "confused_pairs.png"):
        run.log_artifact(folder / name, f"evaluate/{model.name}")
    return row


def ranked(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best first: test accuracy, then macro F1, then the faster model."""
    return sorted(rows, key=lambda r: (-r["test_accuracy"], -r["test_f1"], r["inference_ms_per_image"]))


def leaderboard_markdown(rows: Sequence[dict[str, Any]], dataset: str, test_images: int) -> str:
    columns = [c for c in rows[0] if c not in ("file",)]
    lines = [
        f"# Leaderboard: {dataset}, {test_images} test images",
        "",
        "| rank | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for rank, row in enumerate(rows, 1):
        lines.append(f"| {rank} | " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def crown(champion: saved.SavedModel) -> dict[str, Any]:
    """Copy the champion beside the stage models: data/models/champion.keras + champion.json."""
    with fsio.atomic_file(paths.CHAMPION) as tmp:
        shutil.copyfile(champion.path, tmp)
    meta = {**champion.meta, "champion_of": champion.name, "file": paths.CHAMPION.name}
    fsio.write_json(saved.meta_path(paths.CHAMPION), meta)
    return meta


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


def main() -> None:
    params = load_params()
    settings = params.evaluate
    info = device.configure_training(params.train)
    with tracking.stage_run("evaluate", params, info) as run:
        classes = imageset.load_classes(paths.PREPARED)
        test = imageset.load_split(paths.PREPARED, "test", mmap=False)
        if len(test.labels) == 0:
            raise UserError("the test split is empty: raise preprocess.splits.test")
        found = saved.find(MODEL_DIRS)
        rows = []
        keras_models: dict[str, saved.SavedModel] = {}  # by file: the champion is one of them
        with fsio.atomic_dir(paths.EVALUATION) as reports, fsio.atomic_dir(paths.PREDICTIONS) as predictions:
            for path in found:
                model = saved.load(path)
                if model.is_keras:
                    keras_models[str(path)] = model
                with run.nested(model.name, {"model": model.name, "file": str(path)}):
                    row = evaluate_model(model, test, classes, settings, reports, predictions, run)
                    run.log_active({k: v for k, v in row.items() if isinstance(v, (int, float))})
                rows.append(row)
                run.images += len(test.labels)
                log.info("%s: test accuracy %.4f, %.2f ms/image", model.name, row["test_accuracy"], row["inference_ms_per_image"])
        board = ranked(rows)
        fsio.write_json(paths.LEADERBOARD, board)
        with fsio.atomic_file(paths.LEADERBOARD_MD) as tmp:
            tmp.write_text(leaderboard_markdown(board, params.data.dataset, len(test.labels)))
        keras_rows = [r for r in board if r["file"] in keras_models]
        if not keras_rows:
            raise UserError("no Keras model to crown: the champion must be a .keras file (predict loads it)")
        champion = keras_models[keras_rows[0]["file"]]
        crown(champion)
        version = register(champion, settings.registered_model, keras_rows[0], run)
        run.set_tags({"champion": champion.name, "champion.version": version})
        run.log_artifact(paths.LEADERBOARD_MD)
        run.log_metrics({
            "models": len(board),
            "champion_test_accuracy": keras_rows[0]["test_accuracy"],
            "best_test_accuracy": board[0]["test_accuracy"],
            # The leaderboard is a list, which `dvc exp show` does not read: one column per model here.
            "test_accuracy": {row["model"]: row["test_accuracy"] for row in board},
        })
        log.info("champion: %s (test accuracy %.4f), %s version %s", champion.name, keras_rows[0]["test_accuracy"], settings.registered_model, version)


if __name__ == "__main__":
    cli.run(main)
