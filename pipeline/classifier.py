"""Zero-shot classifiers: text features per class, and scoring images with them.

`build_classifier` computes the same weights as open_clip's
`build_zero_shot_classifier`: every prompt in every template, normalised,
averaged per class, re-normalised. Text features are computed once per
taxonomy, never per batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.model import LoadedModel
from pipeline.taxonomy import Taxonomy, fill_template

# Bounds the tokenised batch for the text tower; 80,000 ImageNet prompts at once would not fit.
_TEXT_BATCH = 256


@dataclass(frozen=True)
class ZeroShotClassifier:
    taxonomy: Taxonomy
    version: str
    # [embed_dim, n_classes], columns L2-normalised.
    weights: torch.Tensor
    logit_scale: float
    build_seconds: float

    def probabilities(self, image_features: torch.Tensor) -> torch.Tensor:
        """Softmax over `logit_scale * image_features @ weights`, [n_images, n_classes]."""
        logits = self.logit_scale * image_features.float() @ self.weights
        return logits.softmax(dim=-1)

    def top_labels(self, probabilities: torch.Tensor) -> list[list[tuple[str, float]]]:
        """Per image, the taxonomy's top_k (label, score), highest first."""
        k = self.taxonomy.effective_top_k
        scores, indices = probabilities.topk(k, dim=-1)
        names = self.taxonomy.class_names
        return [
            [(names[i], float(s)) for s, i in zip(row_scores.tolist(), row_indices.tolist(), strict=True)]
            for row_scores, row_indices in zip(scores, indices, strict=True)
        ]


def build_classifier(model: LoadedModel, taxonomy: Taxonomy) -> ZeroShotClassifier:
    started = time.perf_counter()
    columns = [_class_embedding(model, taxonomy, index) for index in range(len(taxonomy.classes))]
    weights = torch.stack(columns, dim=1)
    return ZeroShotClassifier(
        taxonomy=taxonomy,
        version=taxonomy.version(model.identity),
        weights=weights,
        logit_scale=model.logit_scale,
        build_seconds=time.perf_counter() - started,
    )


def _class_embedding(model: LoadedModel, taxonomy: Taxonomy, index: int) -> torch.Tensor:
    texts = [
        fill_template(template, prompt)
        for prompt in taxonomy.classes[index].expanded_prompts()
        for template in taxonomy.templates
    ]
    features = torch.cat([model.encode_texts(texts[i : i + _TEXT_BATCH]) for i in range(0, len(texts), _TEXT_BATCH)])
    mean = features.mean(dim=0)
    return mean / mean.norm()


def as_numpy(features: torch.Tensor) -> np.ndarray:
    return features.detach().cpu().numpy().astype("<f4", copy=False)
