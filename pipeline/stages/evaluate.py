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

from pipeline import cli, fsio, imageset, paths, registry
from pipeline import reports as report_images
from pipeline.errors import UserError
from pipeline.imageset import Split
from pipeline.models import saved
from pipeline.params import EvaluateParams, Params
from pipeline.scores import scores
from pipeline.tracking import StageRun

log = logging.getLogger("evaluate")
MODEL_DIRS = (paths.BASELINE_MODELS, paths.TUNED_MODELS, paths.TRANSFER_MODELS)


def timed_probabilities(model: saved.SavedModel, test: Split, batch_size: int) -> tuple[np.ndarray, float]:
    """Class probabilities and ms/image (reading the shards included), after a warm-up batch:
    graph tracing is not inference."""
    model.predict_proba(test.take([0]))
    start = time.perf_counter()
    probabilities = model.predict_split(test, batch_size)
    return probabilities, 1000 * (time.perf_counter() - start) / test.count


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


def evaluate_model(
    model: saved.SavedModel,
    test: Split,
    classes: Sequence[str],
    settings: EvaluateParams,
    batch_size: int,
    reports: Path,
    predictions: Path,
    run: StageRun,
) -> dict[str, Any]:
    """Score one model, write its reports under `reports`/<model> and its DVC confusion rows; return its row."""
    from sklearn.metrics import classification_report, confusion_matrix

    probabilities, ms_per_image = timed_probabilities(model, test, batch_size)
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
    report_images.confusion_png(matrix, classes, f"{model.name}: test accuracy {row['test_accuracy']:.3f}", folder / "confusion.png")
    with fsio.atomic_file(folder / "confused_pairs.png") as tmp:
        report_images.pairs_png(pairs, test, predicted, classes, per_pair=4).save(tmp, format="PNG")
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


def crown(champion: saved.SavedModel) -> dict[str, Any]:
    """Copy the champion beside the stage models: data/models/champion.keras + champion.json."""
    with fsio.atomic_file(paths.CHAMPION) as tmp:
        shutil.copyfile(champion.path, tmp)
    meta = {**champion.meta, "champion_of": champion.name, "file": paths.CHAMPION.name}
    fsio.write_json(saved.meta_path(paths.CHAMPION), meta)
    return meta


@cli.stage("evaluate")
def main(params: Params, run: StageRun) -> None:
    settings = params.evaluate
    classes = imageset.load_classes(paths.PREPARED)
    test = imageset.load_split(paths.PREPARED, "test")
    if test.count == 0:
        raise UserError("the test split is empty: raise preprocess.splits.test")
    rows = []
    keras_models: dict[str, saved.SavedModel] = {}  # by file: the champion is one of them
    with fsio.atomic_dir(paths.EVALUATION) as reports, fsio.atomic_dir(paths.PREDICTIONS) as predictions:
        for path in saved.find(MODEL_DIRS):
            model = saved.load(path)
            if model.is_keras:
                keras_models[str(path)] = model
            with run.nested(model.name, {"model": model.name, "file": str(path)}):
                row = evaluate_model(model, test, classes, settings, params.train.batch_size, reports, predictions, run)
                run.log_now({k: v for k, v in row.items() if isinstance(v, (int, float))})
            rows.append(row)
            run.images += test.count
            log.info("%s: test accuracy %.4f, %.2f ms/image", model.name, row["test_accuracy"], row["inference_ms_per_image"])
    board = ranked(rows)
    fsio.write_json(paths.LEADERBOARD, board)
    with fsio.atomic_file(paths.LEADERBOARD_MD) as tmp:
        tmp.write_text(report_images.leaderboard_markdown(board, params.data.dataset, test.count))
    keras_rows = [r for r in board if r["file"] in keras_models]
    if not keras_rows:
        raise UserError("no Keras model to crown: the champion must be a .keras file (predict loads it)")
    champion = keras_models[keras_rows[0]["file"]]
    crown(champion)
    version = registry.register(champion, settings.registered_model, keras_rows[0], run)
    run.set_tags({"champion": champion.name, "champion.version": version})
    run.log_artifact(paths.LEADERBOARD_MD)
    run.record({
        "models": len(board),
        "champion_test_accuracy": keras_rows[0]["test_accuracy"],
        "best_test_accuracy": board[0]["test_accuracy"],
        # The leaderboard is a list, which `dvc exp show` does not read: one column per model here.
        "test_accuracy": {row["model"]: row["test_accuracy"] for row in board},
    })
    log.info(
        "champion: %s (test accuracy %.4f), %s version %s",
        champion.name, keras_rows[0]["test_accuracy"], settings.registered_model, version,
    )


if __name__ == "__main__":
    main()
