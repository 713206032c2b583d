"""The labeling engine shared by the worker, `labelstream classify` and the API.

Two steps, so callers can run them on different threads: `prepare` (fetch,
decode, preprocess; I/O and CPU) and `label` (one model call per batch).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.classifier import ZeroShotClassifier, as_numpy
from pipeline.config import ImageSettings, Settings
from pipeline.dedupe import DedupeCache, content_key
from pipeline.preprocess import Preprocessor
from pipeline.fetch import ImageFetcher
from pipeline.model import LoadedModel
from pipeline.registry import ClassifierRegistry
from pipeline.routing import RouteMatch
from schemas.labels import TaxonomyRef
from schemas.requests import ImageSource


@dataclass(frozen=True)
class PreparedImage:
    # None when `cached` holds the answer and the model is skipped.
    pixels: torch.Tensor | None
    fetch_ms: float
    decode_ms: float
    # SHA-256 of the image bytes, when deduplication is on.
    content_key: str | None = None
    cached: ImageLabels | None = None


@dataclass(frozen=True)
class ImageLabels:
    embedding: np.ndarray
    labels: list[tuple[str, float]]
    taxonomy: TaxonomyRef
    infer_ms: float
    # multi_label taxonomies: the classes at or above their thresholds; None in single_label mode.
    selected: list[tuple[str, float]] | None = None
    # The taxonomy's first matching routing rule; None when none matches or it has no routes.
    route: RouteMatch | None = None


class Labeler:
    def __init__(
        self,
        model: LoadedModel,
        registry: ClassifierRegistry,
        image_settings: ImageSettings,
        preprocessor: Preprocessor | None = None,
        dedupe: DedupeCache[ImageLabels] | None = None,
    ) -> None:
        self.model = model
        self.registry = registry
        self.image_settings = image_settings
        # Exact mode (the default) is open_clip's own eval transform, byte for byte.
        self.preprocessor = preprocessor or Preprocessor(model.preprocess, model.preprocess_cfg, "exact")
        # Not `dedupe or ...`: an empty cache has len() 0, so it is falsy.
        self.dedupe: DedupeCache[ImageLabels] = dedupe if dedupe is not None else DedupeCache(0)

    def prepare_bytes(self, data: bytes, fetch_ms: float = 0.0) -> PreparedImage:
        started = time.perf_counter()
        pixels = self.preprocessor(data, self.image_settings)
        return PreparedImage(pixels=pixels, fetch_ms=fetch_ms, decode_ms=_ms_since(started))

    def prepare(self, source: ImageSource, fetcher: ImageFetcher) -> PreparedImage:
        started = time.perf_counter()
        data = fetcher.fetch(source)
        return self.prepare_bytes(data, fetch_ms=_ms_since(started))

    def prepare_deduplicated(
        self, source: ImageSource, fetcher: ImageFetcher, classifier: ZeroShotClassifier
    ) -> PreparedImage:
        """Like `prepare`, but an exact duplicate of a recent image skips decoding and the model."""
        started = time.perf_counter()
        data = fetcher.fetch(source)
        fetch_ms = _ms_since(started)
        if not self.dedupe.enabled:
            return self.prepare_bytes(data, fetch_ms)
        key = content_key(data)
        cached = self._cached_labels(key, classifier)
        if cached is not None:
            return PreparedImage(None, fetch_ms, 0.0, content_key=key, cached=cached)
        return dataclasses.replace(self.prepare_bytes(data, fetch_ms), content_key=key)

    def _cached_labels(self, key: str, classifier: ZeroShotClassifier) -> ImageLabels | None:
        hit = self.dedupe.labels_for(key, classifier.version)
        if hit is None:
            return None
        embedding, labels = hit
        if labels is None:
            # Seen before under another taxonomy version: the embedding still
            # holds, only the classifier's matrix product is needed.
            labels = self._score(torch.from_numpy(embedding.copy()), classifier)
            self.dedupe.store(key, embedding, classifier.version, labels)
        return labels

    def remember(self, key: str | None, labels: ImageLabels) -> None:
        if key is not None:
            self.dedupe.store(key, labels.embedding, labels.taxonomy.version, labels)

    def classifier_for(self, taxonomy: str | None) -> ZeroShotClassifier:
        return self.registry.get(taxonomy)

    def label(self, pixels: list[torch.Tensor], classifiers: list[ZeroShotClassifier]) -> list[ImageLabels]:
        """Encode the batch once, then score each image with its own classifier."""
        started = time.perf_counter()
        features = self.model.encode_images(torch.stack(pixels))
        results = [self._score(f, c) for f, c in zip(features, classifiers, strict=True)]
        infer_ms = _ms_since(started)
        return [dataclasses.replace(r, infer_ms=infer_ms) for r in results]

    def encode(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        """L2-normalised image features for a batch of preprocessed images (one model call)."""
        return self.model.encode_images(torch.stack(pixels))

    def score(self, features: torch.Tensor, classifier: ZeroShotClassifier) -> ImageLabels:
        """One image's labels from its features: what `label` does per image after the model call."""
        return self._score(features, classifier)

    @staticmethod
    def _score(features: torch.Tensor, classifier: ZeroShotClassifier) -> ImageLabels:
        probabilities = classifier.probabilities(features.unsqueeze(0))
        taxonomy = TaxonomyRef(name=classifier.taxonomy.name, version=classifier.version)
        selected = classifier.selected_labels(probabilities)
        top = classifier.top_labels(probabilities)[0]
        listed = top if selected is None else selected[0]
        return ImageLabels(
            as_numpy(features),
            top,
            taxonomy,
            0.0,
            selected=None if selected is None else selected[0],
            route=classifier.route(probabilities[0], listed),
        )


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0


def build_labeler(settings: Settings, model: LoadedModel | None = None) -> Labeler:
    """Load the model (unless given) and every configured taxonomy's classifier, from the cache when it can."""
    from pipeline import metrics
    from pipeline.classifier_cache import ClassifierCache, load_or_build
    from pipeline.model import load_model
    from pipeline.taxonomy_store import default_name, load_configured

    taxonomies = load_configured(settings.taxonomy)
    model = model or load_model(settings.model)
    metrics.MODEL_LOAD_SECONDS.set(model.load_seconds)
    cache = ClassifierCache(settings.taxonomy.cache_dir)
    classifiers = [load_or_build(model, taxonomy, cache) for taxonomy in taxonomies]
    for classifier in classifiers:
        metrics.CLASSIFIER_BUILD_SECONDS.labels(taxonomy=classifier.taxonomy.name).set(classifier.build_seconds)
    registry = ClassifierRegistry(classifiers, default=default_name(settings.taxonomy, taxonomies))
    preprocessor = Preprocessor.for_model(model, settings.preprocess)
    return Labeler(model, registry, settings.image, preprocessor, DedupeCache(settings.cache.max_entries))
