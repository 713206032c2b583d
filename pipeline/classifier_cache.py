"""On-disk cache of classifier text features, keyed by (model identity, taxonomy version).

Building a classifier means encoding every prompt of the taxonomy: 80,000 for
the ImageNet default on the real model. A restart with an unchanged taxonomy
loads the tensors instead. An entry is two files in a folder per model:
`<name>-<version>.pt` (the tensors) and `<name>-<version>.json` (what they
are). Both are written to a temporary file and renamed into place, and the
sidecar goes last, so a reader never sees half an entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import structlog
import torch

from pipeline import metrics
from pipeline.classifier import ClassifierWeights, ZeroShotClassifier, build_weights, classifier_from_weights
from pipeline.model import LoadedModel
from pipeline.taxonomy import Taxonomy

log = structlog.get_logger("labelstream.taxonomy")


class ClassifierCache:
    def __init__(self, directory: Path | None) -> None:
        self.directory = Path(directory) if directory is not None else None

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def entry_path(self, model_identity: str, taxonomy: Taxonomy, version: str) -> Path | None:
        """Where the tensors for this (model, taxonomy version) live; None when the cache is off."""
        if self.directory is None:
            return None
        model_key = hashlib.sha256(model_identity.encode()).hexdigest()[:16]
        return self.directory / model_key / f"{taxonomy.name}-{version}.pt"

    def contains(self, model_identity: str, taxonomy: Taxonomy) -> bool:
        path = self.entry_path(model_identity, taxonomy, taxonomy.version(model_identity))
        return path is not None and _sidecar(path).is_file() and path.is_file()

    def load(self, model_identity: str, taxonomy: Taxonomy) -> ClassifierWeights | None:
        """The cached weights, or None if absent or unusable (which is then rebuilt, not fatal)."""
        version = taxonomy.version(model_identity)
        path = self.entry_path(model_identity, taxonomy, version)
        if path is None or not _sidecar(path).is_file():
            return None
        try:
            return _read_entry(path, model_identity, taxonomy, version)
        except Exception as exc:  # noqa: BLE001 - torch.load raises many types; a bad entry is only a miss
            log.warning("classifier_cache_invalid", taxonomy=taxonomy.name, version=version, path=str(path), error=str(exc))
            return None

    def store(self, model_identity: str, taxonomy: Taxonomy, weights: ClassifierWeights) -> None:
        version = taxonomy.version(model_identity)
        path = self.entry_path(model_identity, taxonomy, version)
        if path is None:
            return
        try:
            _write_entry(path, model_identity, taxonomy, version, weights)
        except OSError as exc:
            # A read-only or full disk costs the next restart time, not this worker its taxonomy.
            log.warning("classifier_cache_write_failed", taxonomy=taxonomy.name, path=str(path), error=str(exc))


def load_or_build(model: LoadedModel, taxonomy: Taxonomy, cache: ClassifierCache) -> ZeroShotClassifier:
    """The taxonomy's classifier, from the cache when it holds this version, else built (and cached)."""
    started = time.perf_counter()
    weights = cache.load(model.identity, taxonomy)
    if weights is not None:
        classifier = classifier_from_weights(model, taxonomy, weights, time.perf_counter() - started)
        metrics.CLASSIFIER_CACHE_HITS.labels(taxonomy=taxonomy.name).inc()
        log.info("classifier_cache_hit", taxonomy=taxonomy.name, version=classifier.version)
        return classifier
    weights = build_weights(model, taxonomy)
    classifier = classifier_from_weights(model, taxonomy, weights, time.perf_counter() - started)
    metrics.CLASSIFIER_BUILDS.labels(taxonomy=taxonomy.name).inc()
    log.info("classifier_built", taxonomy=taxonomy.name, version=classifier.version,
             prompts=taxonomy.prompt_count(), seconds=round(classifier.build_seconds, 3), cached=cache.enabled)
    cache.store(model.identity, taxonomy, weights)
    return classifier


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _describe(model_identity: str, taxonomy: Taxonomy, version: str, weights: ClassifierWeights) -> dict[str, Any]:
    return {
        "taxonomy": taxonomy.name,
        "version": version,
        "model_identity": model_identity,
        "mode": taxonomy.mode,
        "shape": list(weights.positive.shape),
        "prompts": taxonomy.prompt_count(),
    }


def _write_entry(path: Path, model_identity: str, taxonomy: Taxonomy, version: str, weights: ClassifierWeights) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"positive": weights.positive.contiguous()}
    if weights.negative is not None:
        tensors["negative"] = weights.negative.contiguous()
    _write_atomically(path, lambda f: torch.save(tensors, f))
    sidecar = json.dumps(_describe(model_identity, taxonomy, version, weights), indent=2).encode()
    _write_atomically(_sidecar(path), lambda f: f.write(sidecar))


def _write_atomically(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def _read_entry(path: Path, model_identity: str, taxonomy: Taxonomy, version: str) -> ClassifierWeights:
    description = json.loads(_sidecar(path).read_text(encoding="utf-8"))
    if description.get("model_identity") != model_identity or description.get("version") != version:
        raise ValueError("sidecar names another model or version")
    tensors = torch.load(path, map_location="cpu", weights_only=True)
    weights = ClassifierWeights(tensors["positive"], tensors.get("negative"))
    _check_shape(weights, taxonomy)
    return weights


def _check_shape(weights: ClassifierWeights, taxonomy: Taxonomy) -> None:
    classes = len(taxonomy.classes)
    if weights.positive.ndim != 2 or weights.positive.shape[1] != classes:
        raise ValueError(f"cached weights have shape {tuple(weights.positive.shape)}, expected [*, {classes}]")
    if taxonomy.is_multi_label and (weights.negative is None or weights.negative.shape != weights.positive.shape):
        raise ValueError("cached multi-label weights lack matching negative weights")
