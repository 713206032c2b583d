"""Is taxonomy B really better than A on the same images? A paired comparison of top-1 hits.

Both taxonomies score the same cached image embeddings, so each image gives a
pair (A right?, B right?). Only the discordant pairs carry information:
McNemar's test asks whether "A right, B wrong" (b) and "A wrong, B right" (c)
are equally likely. With fewer than 25 discordant pairs it is exact (a
two-sided binomial test); otherwise the chi-squared version with continuity
correction. A paired bootstrap gives a 95% interval for the difference in
accuracy, B minus A.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from labelstream.evaluation.metrics import bootstrap_ci

EXACT_BELOW = 25


@dataclass(frozen=True)
class Comparison:
    baseline: str
    candidate: str
    baseline_accuracy: float
    candidate_accuracy: float
    # candidate minus baseline
    accuracy_difference: float
    difference_ci: tuple[float, float]
    only_baseline_right: int
    only_candidate_right: int
    test: str
    p_value: float

    def as_json(self) -> dict[str, object]:
        data = asdict(self)
        data["difference_ci"] = list(self.difference_ci)
        return data


def mcnemar(b: int, c: int) -> tuple[str, float]:
    """(test name, two-sided p-value) for b and c discordant pairs."""
    n = b + c
    if n == 0:
        return "mcnemar_exact", 1.0
    if n < EXACT_BELOW:
        tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
        return "mcnemar_exact", min(1.0, 2 * tail)
    statistic = (abs(b - c) - 1) ** 2 / n
    # The chi-squared survival function with one degree of freedom.
    return "mcnemar_chi2", math.erfc(math.sqrt(statistic / 2))


def compare_hits(baseline: str, candidate: str, hits_a: np.ndarray, hits_b: np.ndarray) -> Comparison:
    b = int(np.sum(hits_a & ~hits_b))
    c = int(np.sum(~hits_a & hits_b))
    test, p_value = mcnemar(b, c)
    difference = hits_b.astype(float) - hits_a.astype(float)
    return Comparison(
        baseline=baseline,
        candidate=candidate,
        baseline_accuracy=float(hits_a.mean()) if len(hits_a) else float("nan"),
        candidate_accuracy=float(hits_b.mean()) if len(hits_b) else float("nan"),
        accuracy_difference=float(difference.mean()) if len(difference) else float("nan"),
        difference_ci=bootstrap_ci(difference),
        only_baseline_right=b,
        only_candidate_right=c,
        test=test,
        p_value=p_value,
    )
