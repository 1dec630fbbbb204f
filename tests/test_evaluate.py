"""evaluate's parts: confused pairs, scores with top-k, ranking, the leaderboard table, the pairs sheet, timing."""
import dataclasses
from pathlib import Path

import numpy as np

from pipeline import reports
from pipeline.models import cnn, saved
from pipeline.scores import bootstrap_interval
from pipeline.stages.evaluate import (
    confused_pairs,
    model_scores,
    ranked,
    timed_probabilities,
)

from .conftest import split_on_disk


def test_confused_pairs_are_the_largest_off_diagonal_cells_first():
    matrix = np.array([[5, 3, 0], [1, 7, 4], [0, 0, 9]])
    assert confused_pairs(matrix, 5) == [(1, 2, 4), (0, 1, 3), (1, 0, 1)]  # zeros are never pairs
    assert confused_pairs(matrix, 1) == [(1, 2, 4)]
    assert confused_pairs(np.eye(3, dtype=int), 3) == []


def test_model_scores_add_top_k_only_beyond_k_classes():
    labels = np.array([0, 1, 2, 3])
    probabilities = np.array([
        [0.7, 0.1, 0.1, 0.1],   # right
        [0.5, 0.4, 0.05, 0.05],  # wrong, right at top-2
        [0.1, 0.2, 0.3, 0.4],   # wrong, right at top-2
        [0.1, 0.6, 0.2, 0.1],   # wrong, 4th
    ])
    found = model_scores(labels, probabilities, ["a", "b", "c", "d"], top_k=2)
    assert found["test_accuracy"] == 0.25 and found["test_top2_accuracy"] == 0.75
    assert "test_top5_accuracy" not in model_scores(labels, probabilities, ["a", "b", "c", "d"], top_k=5)


def test_ranked_by_validation_accuracy_then_f1_then_speed_never_by_test():
    rows = [
        {"model": "slow", "val_accuracy": 0.8, "val_f1": 0.7, "test_accuracy": 0.9, "inference_ms_per_image": 9.0},
        {"model": "fast", "val_accuracy": 0.8, "val_f1": 0.7, "test_accuracy": 0.5, "inference_ms_per_image": 1.0},
        {"model": "better_f1", "val_accuracy": 0.8, "val_f1": 0.75, "test_accuracy": 0.6, "inference_ms_per_image": 5.0},
        {"model": "best_on_val", "val_accuracy": 0.9, "val_f1": 0.1, "test_accuracy": 0.4, "inference_ms_per_image": 50.0},
        {"model": "best_on_test", "val_accuracy": 0.7, "val_f1": 0.9, "test_accuracy": 0.99, "inference_ms_per_image": 0.5},
    ]
    assert [r["model"] for r in ranked(rows)] == ["best_on_val", "better_f1", "fast", "slow", "best_on_test"]


def test_leaderboard_markdown_shows_val_and_test_with_its_interval_and_no_file_column():
    rows = [
        {"model": "a", "val_accuracy": 0.8, "test_accuracy": 0.9, "test_ci_low": 0.85, "test_ci_high": 0.95, "file": "x.keras"},
        {"model": "b", "val_accuracy": 0.7, "test_accuracy": 0.5, "test_ci_low": 0.3, "test_ci_high": 0.7, "file": "y"},
    ]
    lines = reports.leaderboard_markdown(rows, "rps", 168, 191).splitlines()
    assert lines[0] == (
        "# Leaderboard: rps, ranked by validation accuracy (168 val images); test (191 images) reported, never used to choose"
    )
    assert lines[2] == "| rank | model | val_accuracy | test_accuracy | test 95% interval |"
    assert lines[4:] == ["| 1 | a | 0.8 | 0.9 | [0.85, 0.95] |", "| 2 | b | 0.7 | 0.5 | [0.3, 0.7] |"]


def test_bootstrap_interval_resamples_whole_groups():
    rng = np.random.default_rng(0)
    correct = rng.random(400) < 0.8
    by_image = bootstrap_interval(correct, np.arange(400), seed=0)
    assert by_image[0] < correct.mean() < by_image[1]
    # The normal approximation for 400 independent images: +-1.96 * sqrt(.8 * .2 / 400) = +-0.039
    assert abs((by_image[1] - by_image[0]) / 2 - 0.039) < 0.008
    # The same hits as 20 shots of 20 identical frames: 20 independent pieces of evidence, a far wider interval.
    shots = np.repeat(np.arange(20), 20)
    per_shot = np.repeat(rng.random(20) < 0.8, 20)
    grouped = bootstrap_interval(per_shot, shots, seed=0)
    assert grouped[1] - grouped[0] > 2.5 * (by_image[1] - by_image[0])
    assert bootstrap_interval(per_shot, shots, seed=0) == grouped  # seeded
    assert bootstrap_interval(np.ones(10, bool), np.arange(10), seed=0) == (1.0, 1.0)


def test_pairs_sheet_shows_the_misclassified_test_images(tmp_path):
    images = np.zeros((4, 8, 8, 3), np.uint8)
    images[2] = 255  # the one class-0 image predicted as class 1
    test = split_on_disk(tmp_path, images, [0, 0, 0, 1])
    sheet = reports.pairs_png([(0, 1, 1)], test, np.array([0, 0, 1, 1]), ["a", "b"], per_pair=3)
    assert sheet.size == (220 + 3 * reports.THUMB, reports.THUMB)
    thumb = np.asarray(sheet)[:, 220 : 220 + reports.THUMB]
    assert thumb.min() == 255  # white: image 2, scaled up


@dataclasses.dataclass
class TracesCounted(saved.SavedModel):
    """A real Keras model whose predict_split() notes the predict function's trace count before and after."""

    calls: list[tuple[int, int]] = dataclasses.field(default_factory=list)

    def traces(self) -> int:
        function = self.model.predict_function  # Keras' tf.function, made at the first predict
        return 0 if function is None else function.experimental_get_tracing_count()

    def predict_split(self, split, batch_size=32):
        before = self.traces()
        found = super().predict_split(split, batch_size)
        self.calls.append((before, self.traces()))
        return found


def test_the_timed_pass_traces_nothing(tmp_path):
    """20 images at 8 a batch: two full batches and a short one, each a trace if the timed pass met it first."""
    images = np.random.default_rng(0).integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    test = split_on_disk(tmp_path, images, np.arange(20) % 3)
    keras_model = cnn.classifier("tiny", cnn.Cnn3v2(filters=4, dense_units=8).body, 16, 3)
    model = TracesCounted(Path("tiny.keras"), {"name": "tiny", "classes": ["a", "b", "c"]}, keras_model)

    probabilities, ms_per_image = timed_probabilities(model, test, batch_size=8)

    before, after = model.calls[-1]  # the timed pass is the last
    assert after == before > 0  # traced, but before the timed pass
    np.testing.assert_allclose(probabilities, np.asarray(keras_model.predict(images.astype(np.float32), verbose=0)), atol=1e-5)
    assert ms_per_image > 0
