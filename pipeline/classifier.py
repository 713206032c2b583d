"""Zero-shot classifiers: text features per class, and scoring images with them.

`build_classifier` computes the same weights as open_clip's
`build_zero_shot_classifier`: every prompt in every template, normalised,
averaged per class, re-normalised. Text features are computed once per
taxonomy, never per batch.

Scores. With `s` the model's logit scale, `f` an image's normalised features,
`w_c` class c's positive embedding and `n_c` its negative embedding:

- single_label: softmax over all classes of `s * f·w_c` (open_clip's number).
- multi_label: each class on its own, the positive side of a two-way softmax
  `exp(s f·w_c) / (exp(s f·w_c) + exp(s f·n_c))`. `n_c` is built like `w_c`
  from the class's `negative_prompts` (through the taxonomy's templates) or,
  when it has none, from its own prompts wrapped in the taxonomy's
  `negative_templates` ("a photo of something that is not a {}."). A class
  is selected when its score is at or above its threshold.

Routing (pipeline/routing.py) sees every class's score, not only the top_k
a record lists; `label("x")` means x is among the record's labels: the
selected classes in multi_label mode, the listed top_k in single_label mode.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.model import LoadedModel
from pipeline.routing import RouteMatch
from pipeline.taxonomy import Taxonomy

# Bounds the tokenised batch for the text tower; 80,000 ImageNet prompts at once would not fit.
_TEXT_BATCH = 256

Scored = list[tuple[str, float]]


@dataclass(frozen=True)
class ClassifierWeights:
    """The text side of a classifier: what the on-disk cache stores."""

    # [embed_dim, n_classes], columns L2-normalised.
    positive: torch.Tensor
    # multi_label only: [embed_dim, n_classes], each class's negative embedding.
    negative: torch.Tensor | None = None


@dataclass(frozen=True)
class ZeroShotClassifier:
    taxonomy: Taxonomy
    version: str
    # [embed_dim, n_classes], columns L2-normalised.
    weights: torch.Tensor
    logit_scale: float
    build_seconds: float
    # multi_label only; see the module docstring.
    negative_weights: torch.Tensor | None = None

    def probabilities(self, image_features: torch.Tensor) -> torch.Tensor:
        """Per-class scores in [0, 1], [n_images, n_classes]; see the module docstring."""
        logits = self.logit_scale * image_features.float() @ self.weights
        if self.negative_weights is None:
            return logits.softmax(dim=-1)
        negative_logits = self.logit_scale * image_features.float() @ self.negative_weights
        return torch.stack([logits, negative_logits], dim=-1).softmax(dim=-1)[..., 0]

    def top_labels(self, probabilities: torch.Tensor) -> list[Scored]:
        """Per image, the taxonomy's top_k (label, score), highest first."""
        k = self.taxonomy.effective_top_k
        scores, indices = probabilities.topk(k, dim=-1)
        names = self.taxonomy.class_names
        return [
            [(names[i], float(s)) for s, i in zip(row_scores.tolist(), row_indices.tolist(), strict=True)]
            for row_scores, row_indices in zip(scores, indices, strict=True)
        ]

    def selected_labels(self, probabilities: torch.Tensor) -> list[Scored] | None:
        """Per image, every class at or above its threshold, highest first; None in single_label mode."""
        if not self.taxonomy.is_multi_label:
            return None
        thresholds = [self.taxonomy.threshold_of(c) for c in self.taxonomy.classes]
        names = self.taxonomy.class_names
        selected = []
        for row in probabilities.tolist():
            chosen = [(names[i], score) for i, score in enumerate(row) if score >= thresholds[i]]
            selected.append(sorted(chosen, key=lambda pair: pair[1], reverse=True))
        return selected

    def route(self, probabilities: torch.Tensor, listed: Scored) -> RouteMatch | None:
        """The first routing rule one image's scores ([n_classes]) satisfy; None if none does or there are none.

        `listed` is what the image's record lists as its labels (see the module docstring).
        """
        table = self.taxonomy.route_table
        if not table.rules:
            return None
        scores = dict(zip(self.taxonomy.class_names, probabilities.tolist(), strict=True))
        return table.route(scores, frozenset(name for name, _ in listed))


def build_classifier(model: LoadedModel, taxonomy: Taxonomy) -> ZeroShotClassifier:
    started = time.perf_counter()
    weights = build_weights(model, taxonomy)
    return classifier_from_weights(model, taxonomy, weights, time.perf_counter() - started)


def classifier_from_weights(
    model: LoadedModel, taxonomy: Taxonomy, weights: ClassifierWeights, build_seconds: float
) -> ZeroShotClassifier:
    return ZeroShotClassifier(
        taxonomy=taxonomy,
        version=taxonomy.version(model.identity),
        weights=weights.positive,
        logit_scale=model.logit_scale,
        build_seconds=build_seconds,
        negative_weights=weights.negative,
    )


def build_weights(model: LoadedModel, taxonomy: Taxonomy) -> ClassifierWeights:
    """Encode every prompt of the taxonomy: the expensive part a cache saves."""
    positive = torch.stack([text_embedding(model, taxonomy.positive_texts(c)) for c in taxonomy.classes], dim=1)
    if not taxonomy.is_multi_label:
        return ClassifierWeights(positive)
    negative = torch.stack([text_embedding(model, taxonomy.negative_texts(c)) for c in taxonomy.classes], dim=1)
    return ClassifierWeights(positive, negative)


def text_embedding(model: LoadedModel, texts: list[str]) -> torch.Tensor:
    """Mean of the texts' normalised features, re-normalised (open_clip's per-class recipe)."""
    features = torch.cat([model.encode_texts(texts[i : i + _TEXT_BATCH]) for i in range(0, len(texts), _TEXT_BATCH)])
    mean = features.mean(dim=0)
    return mean / mean.norm()


def as_numpy(features: torch.Tensor) -> np.ndarray:
    return features.detach().cpu().numpy().astype("<f4", copy=False)
