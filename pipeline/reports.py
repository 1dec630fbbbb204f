"""What evaluate draws for people: confusion matrices, confused-pair sheets, the leaderboard table."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pipeline import fsio
from pipeline.imageset import Split

THUMB = 64


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
    """A row per confused pair: its caption, then test images of that class predicted as the other (read by seeking)."""
    label_width = 220
    rows = max(len(pairs), 1)
    sheet = Image.new("RGB", (label_width + per_pair * THUMB, rows * THUMB), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for row, (true, wrong, count) in enumerate(pairs):
        draw.text((4, row * THUMB + 4), f"{classes[true]}\n-> {classes[wrong]}\n({count} images)", fill=(0, 0, 0))
        examples = np.flatnonzero((test.labels == true) & (predicted == wrong))[:per_pair]
        for column, image in enumerate(test.take(examples)):
            thumb = Image.fromarray(image).resize((THUMB, THUMB))
            sheet.paste(thumb, (label_width + column * THUMB, row * THUMB))
    return sheet


def leaderboard_markdown(rows: Sequence[dict[str, Any]], dataset: str, val_images: int, test_images: int) -> str:
    """The leaderboard as a table, ranked by validation; the test interval as one `[low, high]` column."""
    columns = [c for c in rows[0] if c not in ("file", "test_ci_low", "test_ci_high")]
    if "test_ci_low" in rows[0]:
        columns.insert(columns.index("test_accuracy") + 1, "test 95% interval")

    def cell(row: dict[str, Any], column: str) -> str:
        if column == "test 95% interval":
            return f"[{row['test_ci_low']}, {row['test_ci_high']}]"
        return str(row.get(column, ""))

    lines = [
        (
            f"# Leaderboard: {dataset}, ranked by validation accuracy ({val_images} val images); "
            f"test ({test_images} images) reported, never used to choose"
        ),
        "",
        "| rank | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for rank, row in enumerate(rows, 1):
        lines.append(f"| {rank} | " + " | ".join(cell(row, c) for c in columns) + " |")
    return "\n".join(lines) + "\n"
