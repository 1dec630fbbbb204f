"""evaluate stage: every saved model on the same val and test splits -> leaderboard, reports, the champion.

Models are ranked, and the champion chosen, by validation accuracy: the test split is reported, never
used to choose, so the champion's test figure is not biased upwards by the choice. Per model: val
accuracy and F1; test accuracy with a 95% bootstrap interval over whole shots (registry.py, scores.py),
top-k (more than k classes only), macro precision/recall/F1, a per-class report, a confusion matrix (PNG,
and rows for DVC's confusion plot), the most confused class pairs with test thumbnails, inference
ms/image and file size. The best Keras model becomes data/models/champion.keras and a version of the
dataset's registered model in MLflow (champion or challenger alias: registry.py).
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
from pipeline.scores import bootstrap_interval, scores
from pipeline.tracking import StageRun

log = logging.getLogger("evaluate")
MODEL_DIRS = (paths.BASELINE_MODELS, paths.TUNED_MODELS, paths.TRANSFER_MODELS)


def timed_probabilities(model: saved.SavedModel, test: Split, batch_size: int) -> tuple[np.ndarray, float]:
    """Class probabilities and ms/image (reading the shards included) of a second pass over `test`.

    Graph tracing is not inference: the first pass is the very same call, so it traces every input the timed
    one feeds Keras' predict function (float32 stream batches, the full ones and the shorter last one), and
    the timed pass traces nothing. A warm-up on any other input (one uint8 image, say) leaves those traces to it.
    """
    model.predict_split(test, batch_size)
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
    val: Split,
    test: Split,
    test_groups: np.ndarray,
    seed: int,
    classes: Sequence[str],
    settings: EvaluateParams,
    batch_size: int,
    reports: Path,
    predictions: Path,
    run: StageRun,
) -> dict[str, Any]:
    """Score one model, write its reports under `reports`/<model> and its DVC confusion rows; return its row."""
    from sklearn.metrics import classification_report, confusion_matrix

    val_scores = scores(val.labels, model.predict_split(val, batch_size), "val_")
    probabilities, ms_per_image = timed_probabilities(model, test, batch_size)
    predicted = probabilities.argmax(axis=1)
    low, high = bootstrap_interval(predicted == test.labels, test_groups, seed)
    everything = np.arange(len(classes))
    matrix = confusion_matrix(test.labels, predicted, labels=everything)
    pairs = confused_pairs(matrix, settings.confused_pairs)
    row = {
        "model": model.name,
        "stage": model.meta["stage"],
        "val_accuracy": val_scores["val_accuracy"],
        "val_f1": val_scores["val_f1"],
        **model_scores(test.labels, probabilities, classes, settings.top_k),
        "test_ci_low": low,
        "test_ci_high": high,
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
    """Best first by validation: accuracy, then macro F1, then the faster model. Test scores never rank."""
    return sorted(rows, key=lambda r: (-r["val_accuracy"], -r["val_f1"], r["inference_ms_per_image"]))


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
    val, test = imageset.load_split(paths.PREPARED, "val"), imageset.load_split(paths.PREPARED, "test")
    for name, split in (("val", val), ("test", test)):
        if split.count == 0:
            raise UserError(f"the {name} split is empty: evaluate needs it (raise preprocess.splits.{name})")
    test_groups = imageset.groups_of(paths.PREPARED, "test", test)
    rows = []
    keras_models: dict[str, saved.SavedModel] = {}  # by file: the champion is one of them
    with fsio.atomic_dir(paths.EVALUATION) as reports, fsio.atomic_dir(paths.PREDICTIONS) as predictions:
        for path in saved.find(MODEL_DIRS):
            model = saved.load(path)
            if model.is_keras:
                keras_models[str(path)] = model
            with run.nested(model.name, {"model": model.name, "file": str(path)}):
                row = evaluate_model(
                    model, val, test, test_groups, params.seed, classes, settings, params.train.batch_size,
                    reports, predictions, run,
                )
                run.log_now({k: v for k, v in row.items() if isinstance(v, (int, float))})
            rows.append(row)
            run.images += val.count + test.count
            log.info(
                "%s: val accuracy %.4f, test accuracy %.4f [%.4f, %.4f], %.2f ms/image", model.name,
                row["val_accuracy"], row["test_accuracy"], row["test_ci_low"], row["test_ci_high"],
                row["inference_ms_per_image"],
            )
    board = ranked(rows)
    fsio.write_json(paths.LEADERBOARD, board)
    with fsio.atomic_file(paths.LEADERBOARD_MD) as tmp:
        tmp.write_text(report_images.leaderboard_markdown(board, params.data.dataset, val.count, test.count))
    keras_rows = [r for r in board if r["file"] in keras_models]
    if not keras_rows:
        raise UserError("no Keras model to crown: the champion must be a .keras file (predict loads it)")
    best, row = keras_models[keras_rows[0]["file"]], keras_rows[0]
    crown(best)
    fingerprint = imageset.fingerprint(test, classes)
    example = test.take([0])[0]  # the registered model's input example
    name, version, decision = registry.register(best, settings.registered_model, row, fingerprint, run, example)
    run.set_tags({
        "champion": best.name, "registered_model": name, "registered.version": version,
        "registered.alias": decision.alias, "test_fingerprint": fingerprint,
    })
    run.log_artifact(paths.LEADERBOARD_MD)
    run.log_experiment(params)
    run.record({
        "models": len(board),
        "champion_val_accuracy": row["val_accuracy"],
        "champion_test_accuracy": row["test_accuracy"],
        "champion_test_ci_low": row["test_ci_low"],
        "champion_test_ci_high": row["test_ci_high"],
        # The leaderboard is a list, which `dvc exp show` does not read: one column per model here.
        "val_accuracy": {r["model"]: r["val_accuracy"] for r in board},
        "test_accuracy": {r["model"]: r["test_accuracy"] for r in board},
    })
    log.info(
        "best by validation: %s (val %.4f; test %.4f, 95%% interval %.4f-%.4f); %s version %s is the %s: %s",
        best.name, row["val_accuracy"], row["test_accuracy"], row["test_ci_low"], row["test_ci_high"],
        name, version, decision.alias, decision.reason,
    )


if __name__ == "__main__":
    main()
