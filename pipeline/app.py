"""A Gradio app over the champion: classify a photo, and see how the model scores and how it fails.

    python -m pipeline.app [--model data/models/champion.keras | --registered NAME] [--host 127.0.0.1] [--port 7860]

Tab "Classify": upload or paste an image (or click one of the test split's photos); the top labels with
their probabilities, the model, its dataset, its test accuracy with the 95% interval, and the time this
image took. The file is decoded by the pipeline's own code (pipeline.predict.decode), so a file preprocess
would quarantine is refused with the same reason. Tab "Leaderboard": every model on the test split
(metrics/leaderboard.json) and the champion's confusion matrix and most-confused pairs (reports/evaluate/).
Needs the `app` extra: pip install -c constraints.txt -e '.[app]'.
"""
from __future__ import annotations

import argparse
import os
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import cli, fsio, paths, predict
from pipeline.errors import UserError
from pipeline.models import saved

TOP_K = 5
EXAMPLES_PER_CLASS = 1
MAX_EXAMPLES = 6
LEADERBOARD_COLUMNS = ["model", "stage", "val_accuracy", "test_accuracy", "test_ci_low", "test_ci_high", "test_f1", "inference_ms_per_image"]


@dataclass
class Champion:
    model: saved.SavedModel
    name: str  # the model's name on the leaderboard (the champion file's `champion_of`)
    dataset: str
    test_accuracy: float | None
    interval: tuple[float, float] | None
    source: str  # where it was loaded from


def _score_row(name: str, leaderboard: Path) -> dict[str, Any]:
    if not leaderboard.is_file():
        return {}
    return next((row for row in fsio.read_json(leaderboard) if row["model"] == name), {})


def load_file(path: Path, leaderboard: Path = paths.LEADERBOARD) -> Champion:
    """A saved model, its test scores from the leaderboard evaluate wrote (none where it is not there)."""
    model = saved.load(path)
    name = model.meta.get("champion_of", model.name)
    row = _score_row(name, leaderboard)
    interval = (row["test_ci_low"], row["test_ci_high"]) if "test_ci_low" in row else None
    return Champion(model, name, model.meta.get("dataset") or "?", row.get("test_accuracy"), interval, str(path))


def load_registered(name: str) -> Champion:
    """The `champion` version of a registered model (the pyfunc serving.py logs): its saved model file, and
    the test scores its version tags record."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline import tracking
    from pipeline.params import load_params

    if paths.PARAMS.is_file():  # in the project: its own store, as the stages use it
        mlflow.set_tracking_uri(tracking.tracking_uri(load_params()))
    uri = f"models:/{name}@champion"
    try:
        version = mlflow.MlflowClient().get_model_version_by_alias(name, "champion")
        root = Path(mlflow.artifacts.download_artifacts(uri))
    except MlflowException as exc:
        raise UserError(f"{uri}: cannot load it from {mlflow.get_tracking_uri()} ({exc.message})") from None
    [model_file] = [p for p in (root / "artifacts").iterdir() if p.suffix in saved.SUFFIXES]
    tags = version.tags
    low, _, high = tags.get("test_accuracy_ci", "").partition("-")
    return Champion(
        saved.load(model_file), tags.get("model", name), tags.get("dataset", "?"),
        float(tags["test_accuracy"]) if "test_accuracy" in tags else None,
        (float(low), float(high)) if high else None, f"{uri} (version {version.version})",
    )


def describe(champion: Champion) -> str:
    """One line: which model, on which data, how good on the test split."""
    score = "test accuracy not recorded"
    if champion.test_accuracy is not None:
        score = f"test accuracy {champion.test_accuracy:.1%}"
        if champion.interval:
            score += f" (95% interval {champion.interval[0]:.1%}-{champion.interval[1]:.1%})"
    return f"**{champion.name}** on **{champion.dataset}**, {score}; loaded from `{champion.source}`"


def classify(champion: Champion, file: str | Path, k: int = TOP_K) -> tuple[dict[str, float] | None, str]:
    """The top-k labels ({label: probability}) of one image file and a line saying what happened: the time it
    took, or why the file is refused (the reason preprocess would quarantine it for)."""
    start = time.perf_counter()
    [(_, result)] = predict.predict_sources(champion.model, [(file, Path(file))], k)
    ms = 1000 * (time.perf_counter() - start)
    if "error" in result:
        return None, f"**Refused:** {result['error']}"
    ranked = {entry["label"]: entry["probability"] for entry in result["top_k"]}
    return ranked, f"**{result['label']}** ({result['probability']:.1%}), decoded and classified in {ms:.0f} ms"


def example_files(directory: Path, prepared: Path = paths.PREPARED, raw: Path = paths.RAW) -> list[Path]:
    """A few original photos of the test split (one per class, up to MAX_EXAMPLES) copied out of data/raw.tar
    into `directory`; none when the prepared data is not there (a model loaded from the registry elsewhere)."""
    if not (prepared / "manifest.json").is_file() or not raw.is_file():
        return []
    wanted: dict[str, str] = {}  # member -> its class
    per_class: dict[str, int] = {}
    for entry in sorted((e for e in fsio.read_json(prepared / "manifest.json")["files"] if e.get("split") == "test"), key=lambda e: e["row"]):
        if per_class.get(entry["class"], 0) < EXAMPLES_PER_CLASS and len(wanted) < MAX_EXAMPLES:
            wanted[entry["path"]] = entry["class"]
            per_class[entry["class"]] = per_class.get(entry["class"], 0) + 1
    found = []
    with tarfile.open(raw) as tar:
        for member in tar:
            if member.name in wanted and member.isfile():
                out = directory / f"{wanted[member.name]}-{Path(member.name).name}"
                out.write_bytes(tar.extractfile(member).read())
                found.append(out)
                if len(found) == len(wanted):
                    break
    return sorted(found)


def leaderboard_rows(leaderboard: Path = paths.LEADERBOARD) -> list[list[Any]]:
    if not leaderboard.is_file():
        return []
    return [[row.get(column) for column in LEADERBOARD_COLUMNS] for row in fsio.read_json(leaderboard)]


def failures(champion: Champion, reports: Path = paths.EVALUATION) -> tuple[Path | None, Path | None, str]:
    """The champion's confusion matrix and most-confused pairs (images and a list), as evaluate wrote them."""
    folder = reports / champion.name
    if not (folder / "report.json").is_file():
        return None, None, f"No evaluation report for {champion.name} under {reports}: run `dvc repro evaluate`."
    pairs = fsio.read_json(folder / "report.json")["confused_pairs"]
    lines = [f"- **{p['true']}** taken for **{p['predicted']}**: {p['count']} test images" for p in pairs]
    text = "Most confused on the test split:\n" + "\n".join(lines) if lines else "No confusion on the test split."
    return folder / "confusion.png", folder / "confused_pairs.png", text


def build(champion: Champion, examples: Sequence[Path]) -> Any:
    import gradio as gr

    with gr.Blocks(title="image-pipeline: the champion", analytics_enabled=False) as app:
        gr.Markdown(f"# Classify a photo\n{describe(champion)}")
        with gr.Tab("Classify"):
            with gr.Row():
                with gr.Column():
                    # image_mode=None: Gradio hands over the file as uploaded, undecoded; images.py decodes it within max_pixels.
                    image = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"], label="Image (upload or paste)")
                    if examples:
                        gr.Examples([[str(p)] for p in examples], inputs=image, label="Photos from the test split")
                with gr.Column():
                    labels = gr.Label(num_top_classes=TOP_K, label="Top labels", elem_id="labels")
                    verdict = gr.Markdown(elem_id="verdict")

            def on_image(payload: Any) -> tuple[Any, str]:
                if not payload:
                    return None, ""
                path = payload["path"] if isinstance(payload, dict) else payload.path
                return classify(champion, path)

            # preprocess=False: the uploaded file reaches our decoder as it was sent (Gradio would open and
            # re-encode it with Pillow first, failing on its own terms on a file we refuse with a reason).
            # Gradio still checks the path is one of its uploads.
            image.change(on_image, inputs=image, outputs=[labels, verdict], preprocess=False)
        with gr.Tab("Leaderboard"):
            gr.Markdown("Every model on the same test split, ranked by validation accuracy (metrics/leaderboard.json).")
            gr.Dataframe(leaderboard_rows(), headers=LEADERBOARD_COLUMNS, interactive=False)
            confusion, pairs, text = failures(champion)
            gr.Markdown(f"## How {champion.name} fails\n{text}")
            with gr.Row():
                if confusion:
                    gr.Image(str(confusion), label="Confusion matrix (test split)", interactive=False)
                if pairs:
                    gr.Image(str(pairs), label="Most-confused pairs: test images", interactive=False)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.app", description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", type=Path, default=paths.CHAMPION, help=f"a saved model (default {paths.CHAMPION})")
    which.add_argument("--registered", metavar="NAME", help="a registered MLflow model's champion, e.g. image-classifier-rps")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError("the app needs Gradio: pip install -c constraints.txt -e '.[app]'") from None

    champion = load_registered(args.registered) if args.registered else load_file(args.model)
    size = champion.model.meta["image_size"]
    champion.model.predict_proba(np.zeros((1, size, size, 3), np.uint8))  # the first call traces the graph: not a user's wait
    with tempfile.TemporaryDirectory(prefix="app-examples-") as scratch:
        examples = example_files(Path(scratch))
        app = build(champion, examples)
        print(f"{describe(champion)}; http://{args.host}:{args.port}", file=sys.stderr)
        app.launch(server_name=args.host, server_port=args.port, allowed_paths=[scratch], show_error=True)


if __name__ == "__main__":
    cli.run(main)
