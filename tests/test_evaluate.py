"""evaluate's pure parts: confused pairs, scores with top-k, ranking, the leaderboard table, the pairs sheet."""
import numpy as np

from pipeline import reports
from pipeline.stages.evaluate import confused_pairs, model_scores, ranked

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


def test_ranked_by_accuracy_then_f1_then_speed():
    rows = [
        {"model": "slow", "test_accuracy": 0.8, "test_f1": 0.7, "inference_ms_per_image": 9.0},
        {"model": "fast", "test_accuracy": 0.8, "test_f1": 0.7, "inference_ms_per_image": 1.0},
        {"model": "better_f1", "test_accuracy": 0.8, "test_f1": 0.75, "inference_ms_per_image": 5.0},
        {"model": "best", "test_accuracy": 0.9, "test_f1": 0.1, "inference_ms_per_image": 50.0},
    ]
    assert [r["model"] for r in ranked(rows)] == ["best", "better_f1", "fast", "slow"]


def test_leaderboard_markdown_has_a_row_per_model_and_no_file_column():
    rows = [{"model": "a", "test_accuracy": 0.9, "file": "x.keras"}, {"model": "b", "test_accuracy": 0.5, "file": "y"}]
    text = reports.leaderboard_markdown(rows, "rps", 191)
    lines = text.splitlines()
    assert lines[0] == "# Leaderboard: rps, 191 test images"
    assert lines[2] == "| rank | model | test_accuracy |"
    assert lines[4:] == ["| 1 | a | 0.9 |", "| 2 | b | 0.5 |"]


def test_pairs_sheet_shows_the_misclassified_test_images(tmp_path):
    images = np.zeros((4, 8, 8, 3), np.uint8)
    images[2] = 255  # the one class-0 image predicted as class 1
    test = split_on_disk(tmp_path, images, [0, 0, 0, 1])
    sheet = reports.pairs_png([(0, 1, 1)], test, np.array([0, 0, 1, 1]), ["a", "b"], per_pair=3)
    assert sheet.size == (220 + 3 * reports.THUMB, reports.THUMB)
    thumb = np.asarray(sheet)[:, 220 : 220 + reports.THUMB]
    assert thumb.min() == 255  # white: image 2, scaled up
