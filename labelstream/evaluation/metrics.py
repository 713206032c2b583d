"""Evaluation metrics in plain numpy, so every number can be checked by hand.

Conventions: `scores` is [n_images, n_classes]; `truth` is a boolean
[n_images, n_classes] matrix (one True per row for single-label data);
`predicted` is the top-1 class index per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BOOTSTRAP_SAMPLES = 1000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class ClassReport:
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class PrCurve:
    precision: np.ndarray
    recall: np.ndarray
    # thresholds[i] is the score cut-off giving precision[i], recall[i] (score >= threshold).
    thresholds: np.ndarray


def topk_hits(scores: np.ndarray, truth: np.ndarray, k: int) -> np.ndarray:
    """Per image: is any true class among the k highest scores?"""
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(truth, top, axis=1).any(axis=1)


def bootstrap_ci(values: np.ndarray, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of `values`."""
    if len(values) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)
    tail = (1.0 - CONFIDENCE) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def confusion_matrix(true_index: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts, rows are true classes and columns predicted classes."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (true_index, predicted), 1)
    return matrix


def per_class_reports(confusion: np.ndarray) -> list[ClassReport]:
    tp = np.diag(confusion).astype(float)
    predicted = confusion.sum(axis=0).astype(float)
    support = confusion.sum(axis=1)
    precision = _safe_divide(tp, predicted)
    recall = _safe_divide(tp, support.astype(float))
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    return [ClassReport(float(p), float(r), float(f), int(s)) for p, r, f, s in zip(precision, recall, f1, support, strict=True)]


def macro_average(reports: list[ClassReport]) -> dict[str, float]:
    """Unweighted mean over the classes that have images (a class nobody tested says nothing)."""
    present = [r for r in reports if r.support > 0] or reports
    return {
        "precision": float(np.mean([r.precision for r in present])),
        "recall": float(np.mean([r.recall for r in present])),
        "f1": float(np.mean([r.f1 for r in present])),
    }


def micro_average(confusion: np.ndarray) -> dict[str, float]:
    """Pooled counts; for single-label data all three equal top-1 accuracy."""
    tp = float(np.trace(confusion))
    total = float(confusion.sum())
    value = tp / total if total else 0.0
    return {"precision": value, "recall": value, "f1": value}


def most_confused(confusion: np.ndarray, labels: list[str], limit: int = 10) -> list[dict[str, object]]:
    """The off-diagonal cells with the most images, largest first."""
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:limit]
    pairs = []
    for flat in order:
        row, col = np.unravel_index(flat, off.shape)
        if off[row, col] == 0:
            break
        pairs.append({"true": labels[row], "predicted": labels[col], "count": int(off[row, col])})
    return pairs


def pr_curve(is_positive: np.ndarray, scores: np.ndarray) -> PrCurve:
    """Precision and recall at every distinct score used as a threshold, thresholds ascending."""
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_truth = scores[order], is_positive[order].astype(float)
    true_positives, taken = np.cumsum(sorted_truth), np.arange(1, len(scores) + 1)
    # The last index of each run of equal scores: a threshold takes all ties at once.
    last_of_run = np.r_[np.nonzero(np.diff(sorted_scores))[0], len(scores) - 1] if len(scores) else np.array([], int)
    positives = sorted_truth.sum()
    precision = true_positives[last_of_run] / taken[last_of_run]
    recall = true_positives[last_of_run] / positives if positives else np.zeros(len(last_of_run))
    return PrCurve(precision[::-1], recall[::-1], sorted_scores[last_of_run][::-1])


def average_precision(is_positive: np.ndarray, scores: np.ndarray) -> float:
    """Sum over thresholds of (R_n - R_{n-1}) * P_n (scikit-learn's definition, no interpolation)."""
    if not is_positive.any():
        return float("nan")
    curve = pr_curve(is_positive, scores)
    recall = curve.recall[::-1]
    steps = np.diff(np.r_[0.0, recall])
    return float(np.sum(steps * curve.precision[::-1]))


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    out = np.zeros_like(numerator, dtype=float)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out
