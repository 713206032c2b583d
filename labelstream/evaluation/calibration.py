"""Per-class thresholds chosen from labelled data, and the taxonomy copy that ships them.

A class is selected when its score is at or above its threshold (see
pipeline/classifier.py), so precision and recall at threshold t count the
images with score >= t.

- `--target-precision P`: the lowest threshold whose precision on the data is
  at least P (the most recall that still meets the target).
- `--target-recall R`: the highest threshold whose recall is at least R (the
  lowest threshold always has recall 1, so "lowest" would say nothing).

A class where no threshold reaches the target is flagged `reachable: false`
and keeps the threshold it had.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import yaml

from labelstream.evaluation.metrics import pr_curve
from pipeline.errors import TaxonomyError
from pipeline.taxonomy import Taxonomy, load_taxonomy

DEFAULT_REVIEW_RECALL = 0.9


@dataclass(frozen=True)
class Target:
    metric: str  # "precision" or "recall"
    value: float


@dataclass(frozen=True)
class ClassThreshold:
    # The chosen threshold; the class's current one when the target is unreachable.
    threshold: float
    precision: float
    recall: float
    reachable: bool
    # The review band is [review_threshold, threshold): a person looks before anything is done.
    review_threshold: float
    auto_share: float
    review_share: float


def choose_threshold(is_positive: np.ndarray, scores: np.ndarray, target: Target) -> float | None:
    """The threshold meeting the target (see the module docstring), or None when none does."""
    if not is_positive.any():
        return None
    curve = pr_curve(is_positive, scores)
    values = curve.precision if target.metric == "precision" else curve.recall
    meets = np.nonzero(values >= target.value)[0]
    if not len(meets):
        return None
    return float(curve.thresholds[meets[0] if target.metric == "precision" else meets[-1]])


def measure_at(
    is_positive: np.ndarray, scores: np.ndarray, threshold: float, review_recall: float, reachable: bool = True
) -> ClassThreshold:
    """Precision, recall and the auto/review band shares at one threshold."""
    chosen = scores >= threshold
    precision = float(is_positive[chosen].mean()) if chosen.any() else 0.0
    recall = float(chosen[is_positive].mean()) if is_positive.any() else 0.0
    review = choose_threshold(is_positive, scores, Target("recall", review_recall))
    review = threshold if review is None else min(review, threshold)
    auto_share = float(np.mean(chosen)) if len(scores) else 0.0
    review_share = float(np.mean((scores >= review) & ~chosen)) if len(scores) else 0.0
    return ClassThreshold(threshold, precision, recall, reachable, review, auto_share, review_share)


def calibrate(
    truth: np.ndarray, scores: np.ndarray, taxonomy: Taxonomy, target: Target | None,
    review_recall: float = DEFAULT_REVIEW_RECALL,
) -> dict[str, ClassThreshold]:
    """One ClassThreshold per taxonomy class, by name; without a target, at the taxonomy's own thresholds."""
    result = {}
    for index, item in enumerate(taxonomy.classes):
        current = taxonomy.threshold_of(item)
        chosen = None if target is None else choose_threshold(truth[:, index], scores[:, index], target)
        threshold = current if chosen is None else chosen
        reachable = target is None or chosen is not None
        result[item.name] = measure_at(truth[:, index], scores[:, index], threshold, review_recall, reachable)
    return result


def thresholds_as_json(thresholds: dict[str, ClassThreshold]) -> dict[str, dict[str, object]]:
    return {name: asdict(value) for name, value in thresholds.items()}


def write_thresholds(source: Path, taxonomy: Taxonomy, thresholds: dict[str, ClassThreshold], out: Path) -> Taxonomy:
    """A copy of the taxonomy file with each reachable class's threshold set; validated before it is returned.

    The file content changes, so the copy has a new taxonomy version.
    """
    if not taxonomy.is_multi_label:
        raise TaxonomyError(
            f"--write-thresholds needs a multi_label taxonomy; {source} is single_label, whose scores "
            "(a softmax over all classes) would change if thresholds were added"
        )
    document = taxonomy.model_dump(mode="json", exclude_defaults=True)
    document["classes"] = [_with_threshold(c, thresholds.get(c["name"])) for c in document["classes"]]
    header = f"# Thresholds chosen by `labelstream eval` from labelled data; derived from {source.name}.\n"
    out.write_text(header + yaml.safe_dump(document, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return load_taxonomy(out)


def _with_threshold(item: dict[str, object], chosen: ClassThreshold | None) -> dict[str, object]:
    if chosen is None or not chosen.reachable:
        return item
    return {**item, "threshold": chosen.threshold}
