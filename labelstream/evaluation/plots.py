"""Matplotlib figures for the reports, returned as PNG data URIs (so the HTML needs no other file)."""

from __future__ import annotations

import base64
import io
import math

import matplotlib

matplotlib.use("Agg")  # no display, and no GUI toolkit import

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from labelstream.evaluation.metrics import PrCurve  # noqa: E402


def figure_data_uri(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def confusion_heatmap(matrix: np.ndarray, labels: list[str]) -> str:
    """Row-normalised (each true class sums to 1), with the counts written in small matrices."""
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros_like(matrix, dtype=float), where=rows > 0)
    side = min(14.0, 2.5 + 0.35 * len(labels))
    figure, axes = plt.subplots(figsize=(side, side))
    image = axes.imshow(share, cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    axes.set_yticks(range(len(labels)), labels, fontsize=8)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    if len(labels) <= 15:
        for (row, col), count in np.ndenumerate(matrix):
            colour = "white" if share[row, col] > 0.5 else "black"
            axes.text(col, row, str(count), ha="center", va="center", fontsize=8, color=colour)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the true class")
    return figure_data_uri(figure)


def pr_curves(curves: dict[str, PrCurve], marks: dict[str, list[tuple[str, float]]]) -> str:
    """Small multiples, one per class; `marks` puts named thresholds on each curve."""
    columns = min(4, len(curves)) or 1
    rows = math.ceil(len(curves) / columns) or 1
    figure, grid = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.9 * rows), squeeze=False)
    for axes, (name, curve) in zip(grid.flat, curves.items(), strict=False):
        axes.step(curve.recall, curve.precision, where="post", color="#1f77b4")
        for (label, threshold), colour in zip(marks.get(name, []), ("#d62728", "#ff7f0e"), strict=False):
            point = _point_at(curve, threshold)
            if point is not None:
                axes.plot(*point, "o", color=colour, label=f"{label} {threshold:.3f}")
        axes.set_title(name, fontsize=9)
        axes.set_xlim(0, 1.02)
        axes.set_ylim(0, 1.05)
        axes.set_xlabel("recall", fontsize=8)
        axes.set_ylabel("precision", fontsize=8)
        if marks.get(name):
            axes.legend(fontsize=7, loc="lower left")
    for axes in list(grid.flat)[len(curves):]:
        axes.axis("off")
    figure.tight_layout()
    return figure_data_uri(figure)


def _point_at(curve: PrCurve, threshold: float) -> tuple[float, float] | None:
    """(recall, precision) where scores >= threshold: the first curve point at or above it."""
    at_or_above = np.nonzero(curve.thresholds >= threshold)[0]
    if not len(at_or_above):
        return None
    index = at_or_above[0]
    return float(curve.recall[index]), float(curve.precision[index])


def score_histograms(scores_by_label: dict[str, np.ndarray]) -> str:
    """Per label, the distribution of the scores it was given."""
    columns = min(4, len(scores_by_label)) or 1
    rows = math.ceil(len(scores_by_label) / columns) or 1
    figure, grid = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.4 * rows), squeeze=False)
    for axes, (name, scores) in zip(grid.flat, scores_by_label.items(), strict=False):
        axes.hist(scores, bins=20, range=(0, 1), color="#2ca02c")
        axes.set_title(f"{name} (n={len(scores)})", fontsize=9)
        axes.set_xlabel("score", fontsize=8)
    for axes in list(grid.flat)[len(scores_by_label):]:
        axes.axis("off")
    figure.tight_layout()
    return figure_data_uri(figure)
