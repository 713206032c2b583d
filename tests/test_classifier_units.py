"""ZeroShotClassifier scoring and ClassifierRegistry lookups, on hand-made weights (no model)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.classifier import ZeroShotClassifier, as_numpy
from pipeline.errors import TaxonomyError
from pipeline.registry import ClassifierRegistry
from pipeline.taxonomy import Taxonomy, TaxonomyClass

LOGIT_SCALE = 100.0


def _taxonomy(name: str, classes: tuple[str, ...], top_k: int = 5) -> Taxonomy:
    return Taxonomy(name=name, templates=("a {}",), classes=tuple(TaxonomyClass(name=c) for c in classes), top_k=top_k)


def _classifier(name: str = "axes", classes: tuple[str, ...] = ("x", "y", "z"), top_k: int = 5, version: str = "v1") -> ZeroShotClassifier:
    # Class i's text embedding is the i-th unit vector of a 4-d space.
    weights = torch.eye(4)[:, : len(classes)]
    return ZeroShotClassifier(
        taxonomy=_taxonomy(name, classes, top_k), version=version, weights=weights, logit_scale=LOGIT_SCALE, build_seconds=0.0
    )


def _unit(*values: float) -> torch.Tensor:
    vector = torch.tensor(values, dtype=torch.float32)
    return vector / vector.norm()


def test_probabilities_are_the_scaled_softmax() -> None:
    classifier = _classifier()
    features = torch.stack([_unit(1, 0, 0, 0), _unit(0.6, 0.8, 0, 0)])
    probabilities = classifier.probabilities(features)

    assert probabilities.shape == (2, 3)
    assert torch.allclose(probabilities.sum(dim=-1), torch.ones(2), atol=1e-6)
    logits = [LOGIT_SCALE * 0.6, LOGIT_SCALE * 0.8, 0.0]
    expected = [math.exp(v - max(logits)) for v in logits]
    expected = [v / sum(expected) for v in expected]
    assert probabilities[1].tolist() == pytest.approx(expected, abs=1e-6)


def test_probabilities_accept_half_precision_features() -> None:
    classifier = _classifier()
    features = _unit(0, 0, 1, 0).unsqueeze(0)
    assert torch.allclose(classifier.probabilities(features.half()), classifier.probabilities(features), atol=1e-3)


def test_top_labels_are_sorted_and_cut_to_top_k() -> None:
    classifier = _classifier(classes=("x", "y", "z"), top_k=2)
    probabilities = classifier.probabilities(torch.stack([_unit(0.1, 0.2, 0.9, 0), _unit(0.9, 0.1, 0.3, 0)]))
    first, second = classifier.top_labels(probabilities)

    assert [label for label, _ in first] == ["z", "y"]
    assert [label for label, _ in second] == ["x", "z"]
    assert first[0][1] >= first[1][1]
    assert all(isinstance(score, float) for _, score in first + second)


def test_top_k_larger_than_the_class_count_returns_every_class() -> None:
    classifier = _classifier(classes=("x", "y"), top_k=10)
    [row] = classifier.top_labels(classifier.probabilities(_unit(1, 1, 0, 0).unsqueeze(0)))
    assert sorted(label for label, _ in row) == ["x", "y"]


def test_as_numpy_is_little_endian_float32() -> None:
    array = as_numpy(torch.ones(3, dtype=torch.float64))
    assert array.dtype == np.dtype("<f4")
    assert array.tolist() == [1.0, 1.0, 1.0]


# --- registry ----------------------------------------------------------------------


def test_registry_needs_at_least_one_classifier() -> None:
    with pytest.raises(TaxonomyError):
        ClassifierRegistry([])


def test_registry_default_is_the_first_unless_named() -> None:
    first, second = _classifier("first"), _classifier("second")
    assert ClassifierRegistry([first, second]).get(None) is first
    assert ClassifierRegistry([first, second], default="second").get(None) is second
    assert ClassifierRegistry([first, second]).get("second") is second
    assert ClassifierRegistry([first, second]).names() == ["first", "second"]


def test_registry_rejects_a_default_it_does_not_hold() -> None:
    with pytest.raises(TaxonomyError, match="missing"):
        ClassifierRegistry([_classifier("first")], default="missing")


def test_unknown_taxonomy_is_a_validate_stage_error_naming_what_is_loaded() -> None:
    registry = ClassifierRegistry([_classifier("first"), _classifier("second")])
    with pytest.raises(TaxonomyError) as caught:
        registry.get("third")
    assert caught.value.code == "taxonomy.unknown"
    assert caught.value.stage == "validate"
    assert caught.value.retryable is False
    assert "third" in str(caught.value) and "first" in str(caught.value) and "second" in str(caught.value)


def test_registry_swap_replaces_one_taxonomy_and_returns_the_old_one() -> None:
    old, other = _classifier("live", version="v1"), _classifier("other")
    registry = ClassifierRegistry([old, other])
    new = _classifier("live", version="v2")

    assert registry.swap(new) is old
    assert registry.get("live") is new
    assert registry.get("other") is other
    assert registry.swap(_classifier("added")) is None
    assert registry.names() == ["added", "live", "other"]


def test_registry_remove_cannot_remove_the_default() -> None:
    registry = ClassifierRegistry([_classifier("main"), _classifier("extra")])
    assert registry.remove("extra") is True
    assert registry.remove("extra") is False
    with pytest.raises(TaxonomyError):
        registry.get("extra")
    with pytest.raises(TaxonomyError):
        registry.remove("main")
    assert registry.get(None).taxonomy.name == "main"
