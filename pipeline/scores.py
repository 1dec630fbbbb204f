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
