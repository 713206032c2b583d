"""Which classifier a /v1/classify request scores with: a loaded taxonomy, or an inline label set.

An inline set (`labels`, optional `templates`, `mode`, `threshold`, `top_k`)
becomes a Taxonomy named after its content hash and is built with the same
code as a taxonomy file (pipeline/classifier.py), so its scores equal a
taxonomy file's with the same classes and templates. Built classifiers are
kept in a small LRU keyed by that hash; the text tower runs only on a miss.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict

from api.errors import ApiError
from pipeline.classifier import ZeroShotClassifier, build_classifier
from pipeline.errors import LabelstreamError, TaxonomyError
from pipeline.labeler import Labeler
from pipeline.taxonomy import Taxonomy
from schemas.openai import ClassifyRequest

# open_clip's simplest template; a request that names none gets this one.
DEFAULT_TEMPLATES = ("a photo of a {}.",)
DEFAULT_TOP_K = 5


class InlineClassifiers:
    def __init__(self, labeler: Labeler, max_entries: int) -> None:
        self.labeler, self.max_entries = labeler, max_entries
        self._built: OrderedDict[str, ZeroShotClassifier] = OrderedDict()
        self._lock = threading.Lock()

    def resolve(self, body: ClassifyRequest) -> ZeroShotClassifier:
        """The request's classifier; runs the text tower for an inline set not seen recently (call off the event loop)."""
        if body.labels is None:
            if body.templates is not None or body.threshold is not None or body.top_k is not None:
                raise ApiError(400, "templates, threshold and top_k only apply to inline labels", code="invalid_request",
                               param="labels")
            return self._named(body.taxonomy)
        if body.taxonomy is not None:
            raise ApiError(400, "give either a taxonomy or inline labels, not both", code="invalid_request",
                           param="taxonomy")
        return self._inline(body)

    def _named(self, name: str | None) -> ZeroShotClassifier:
        try:
            return self.labeler.classifier_for(name)
        except LabelstreamError as exc:
            raise ApiError(404, exc.message, code=exc.code, param="taxonomy") from None

    def _inline(self, body: ClassifyRequest) -> ZeroShotClassifier:
        document = inline_document(body)
        key = hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()
        with self._lock:
            cached = self._built.get(key)
            if cached is not None:
                self._built.move_to_end(key)
                return cached
        classifier = build_classifier(self.labeler.model, _taxonomy(document, key))
        with self._lock:
            self._built[key] = classifier
            while len(self._built) > self.max_entries:
                self._built.popitem(last=False)
        return classifier


def inline_document(body: ClassifyRequest) -> dict[str, object]:
    """The taxonomy document an inline request describes (without its name)."""
    labels = body.labels or []
    document: dict[str, object] = {
        "mode": body.mode,
        "templates": list(body.templates or DEFAULT_TEMPLATES),
        "classes": list(labels),
        "top_k": body.top_k or min(DEFAULT_TOP_K, max(len(labels), 1)),
    }
    if body.threshold is not None:
        document["threshold"] = body.threshold
    return document


def _taxonomy(document: dict[str, object], key: str) -> Taxonomy:
    try:
        return Taxonomy.model_validate({"name": f"inline-{key[:16]}", **document})
    except ValueError as exc:
        raise ApiError(400, f"invalid inline label set: {_first_problem(exc)}", code="taxonomy.invalid",
                       param="labels") from None
    except TaxonomyError as exc:
        raise ApiError(400, exc.message, code=exc.code, param="labels") from None


def _first_problem(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ())) or "labels"
        return f"{field.replace('classes', 'labels')}: {first.get('msg')}"
    return str(exc)
