"""Turning scores and ground truth into the evaluation result (what `--json` writes).

The JSON keys are a stable interface that other tools and CI read; see
docs/evaluation.md before renaming or removing one (adding is fine).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from labelstream.evaluation import metrics
from labelstream.evaluation.calibration import ClassThreshold, Target, calibrate, thresholds_as_json
from pipeline.taxonomy import Taxonomy

SCHEMA_VERSION = 1


@dataclass
class Evaluation:
    """Everything the report and the JSON need; rows are the images that could be read."""

    taxonomy: Taxonomy
    taxonomy_version: str
    locations: list[str]
    truth: np.ndarray
    scores: np.ndarray
    multi_label_data: bool
    thresholds: dict[str, ClassThreshold] | None
    target: Target | None
    summary: dict[str, object] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return self.taxonomy.class_names

    @property
    def predicted(self) -> np.ndarray:
        return self.scores.argmax(axis=1)

    @property
    def mode(self) -> str:
        return "multi_label" if self.multi_label_data or self.taxonomy.is_multi_label else "single_label"


def evaluate(
    taxonomy: Taxonomy, version: str, locations: list[str], truth: np.ndarray, scores: np.ndarray,
    multi_label_data: bool, target: Target | None, review_recall: float,
) -> Evaluation:
    evaluation = Evaluation(taxonomy, version, locations, truth, scores, multi_label_data, None, target)
    if target is not None or evaluation.mode == "multi_label":
        evaluation.thresholds = calibrate(truth, scores, taxonomy, target, review_recall)
    evaluation.summary = summarise(evaluation)
    return evaluation


def summarise(evaluation: Evaluation) -> dict[str, object]:
    truth, scores, labels = evaluation.truth, evaluation.scores, evaluation.labels
    top1, top5 = metrics.topk_hits(scores, truth, 1), metrics.topk_hits(scores, truth, 5)
    summary: dict[str, object] = {
        "schema_version": SCHEMA_VERSION,
        "mode": evaluation.mode,
        "taxonomy": {"name": evaluation.taxonomy.name, "version": evaluation.taxonomy_version},
        "n_images": int(len(scores)),
        "top1_accuracy": _mean(top1),
        "top1_ci": list(metrics.bootstrap_ci(top1.astype(float))),
        "top5_accuracy": _mean(top5),
        "top5_ci": list(metrics.bootstrap_ci(top5.astype(float))),
    }
    summary.update(_class_metrics(evaluation))
    summary["average_precision"] = {
        name: _finite(metrics.average_precision(truth[:, i], scores[:, i])) for i, name in enumerate(labels)
    }
    present = [v for v in summary["average_precision"].values() if v is not None]  # type: ignore[union-attr]
    summary["mean_average_precision"] = float(np.mean(present)) if present else None
    summary["thresholds"] = None if evaluation.thresholds is None else thresholds_as_json(evaluation.thresholds)
    summary["target"] = None if evaluation.target is None else {"metric": evaluation.target.metric, "value": evaluation.target.value}
    return summary


def _class_metrics(evaluation: Evaluation) -> dict[str, object]:
    """Per-class P/R/F1 from top-1 predictions (single-label data) or from thresholds (multi-label data)."""
    labels = evaluation.labels
    if evaluation.multi_label_data:
        reports = _thresholded_reports(evaluation)
        confusion, confused = None, []
        micro = _micro_from_reports(evaluation)
    else:
        true_index = evaluation.truth.argmax(axis=1)
        matrix = metrics.confusion_matrix(true_index, evaluation.predicted, len(labels))
        reports = metrics.per_class_reports(matrix)
        confusion = {"labels": labels, "matrix": matrix.tolist()}
        confused = metrics.most_confused(matrix, labels)
        micro = metrics.micro_average(matrix)
    return {
        "per_class": {name: vars(r) for name, r in zip(labels, reports, strict=True)},
        "macro": metrics.macro_average(reports),
        "micro": micro,
        "confusion": confusion,
        "most_confused": confused,
    }


def _selections(evaluation: Evaluation) -> np.ndarray:
    taxonomy = evaluation.taxonomy
    thresholds = np.array([taxonomy.threshold_of(c) for c in taxonomy.classes])
    return evaluation.scores >= thresholds


def _thresholded_reports(evaluation: Evaluation) -> list[metrics.ClassReport]:
    selected, truth = _selections(evaluation), evaluation.truth
    reports = []
    for i in range(truth.shape[1]):
        tp = float(np.sum(selected[:, i] & truth[:, i]))
        precision = tp / selected[:, i].sum() if selected[:, i].any() else 0.0
        recall = tp / truth[:, i].sum() if truth[:, i].any() else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        reports.append(metrics.ClassReport(precision, recall, f1, int(truth[:, i].sum())))
    return reports


def _micro_from_reports(evaluation: Evaluation) -> dict[str, float]:
    selected, truth = _selections(evaluation), evaluation.truth
    tp = float(np.sum(selected & truth))
    precision = tp / selected.sum() if selected.any() else 0.0
    recall = tp / truth.sum() if truth.any() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if len(values) else None


def _finite(value: float) -> float | None:
    return None if np.isnan(value) else value
