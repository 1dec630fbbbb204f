"""How a model's class probabilities score against the labels: one definition for every stage."""
from __future__ import annotations

import numpy as np


def scores(labels: np.ndarray, probabilities: np.ndarray, prefix: str = "") -> dict[str, float]:
    """Accuracy and macro precision/recall/F1 over the classes present in `labels` or predicted."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    predicted = probabilities.argmax(axis=1)
    precision, recall, f1, _ = precision_recall_fscore_support(labels, predicted, average="macro", zero_division=0)
    values = {"accuracy": accuracy_score(labels, predicted), "precision": precision, "recall": recall, "f1": f1}
    return {f"{prefix}{k}": round(float(v), 4) for k, v in values.items()}


def bootstrap_interval(
    correct: np.ndarray, groups: np.ndarray, seed: int, resamples: int = 2000, level: float = 0.95
) -> tuple[float, float]:
    """A percentile bootstrap interval for accuracy that resamples whole groups (the shots of a burst, or
    single images when every image is its own group): frames of one shot are not independent evidence, so
    resampling them one by one would make the interval too narrow."""
    _, group_of = np.unique(groups, return_inverse=True)
    hits = np.bincount(group_of, weights=correct.astype(np.float64))
    sizes = np.bincount(group_of).astype(np.float64)
    drawn = np.random.default_rng(seed).integers(0, len(sizes), (resamples, len(sizes)))
    accuracies = hits[drawn].sum(axis=1) / sizes[drawn].sum(axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(accuracies, [tail, 100 - tail])
    return round(float(low), 4), round(float(high), 4)
