"""`labelstream classify`: label images offline with the worker's own engine."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from labelstream.logs import configure_logging
from labelstream.sources import is_s3_uri, read_local_image, s3_source
from pipeline.config import Settings, load_settings
from pipeline.errors import LabelstreamError
from pipeline.fetch import ImageFetcher
from pipeline.labeler import ImageLabels, Labeler, PreparedImage, build_labeler


@dataclass(frozen=True)
class ClassifyResult:
    image: str
    labels: ImageLabels | None = None
    error: LabelstreamError | None = None


def classify(images: list[str], as_json: bool, taxonomy: Path | None, config_file: Path | None) -> int:
    settings = load_settings(config_file)
    if taxonomy is not None:
        settings = settings.model_copy(update={"taxonomy": settings.taxonomy.model_copy(update={"path": taxonomy})})
    configure_logging(settings.log)
    labeler = build_labeler(settings)
    results = classify_images(labeler, settings, images)
    _print_results(results, as_json)
    return 1 if any(r.error for r in results) else 0


def classify_images(labeler: Labeler, settings: Settings, images: list[str]) -> list[ClassifyResult]:
    fetcher = ImageFetcher(settings.s3, settings.fetch)
    results: list[ClassifyResult] = []
    for start in range(0, len(images), settings.batch.max_size):
        results.extend(_classify_batch(labeler, fetcher, settings, images[start : start + settings.batch.max_size]))
    return results


def _classify_batch(labeler: Labeler, fetcher: ImageFetcher, settings: Settings, names: list[str]) -> list[ClassifyResult]:
    prepared: dict[str, PreparedImage] = {}
    failed: dict[str, LabelstreamError] = {}
    for name in names:
        try:
            prepared[name] = _prepare(labeler, fetcher, settings, name)
        except LabelstreamError as exc:
            failed[name] = exc
    classifier = labeler.classifier_for(None)
    ok = list(prepared)
    labels = labeler.label([prepared[n].pixels for n in ok], [classifier] * len(ok)) if ok else []
    by_name = dict(zip(ok, labels, strict=True))
    return [ClassifyResult(n, labels=by_name.get(n), error=failed.get(n)) for n in names]


def _prepare(labeler: Labeler, fetcher: ImageFetcher, settings: Settings, name: str) -> PreparedImage:
    if is_s3_uri(name):
        return labeler.prepare(s3_source(name), fetcher)
    return labeler.prepare_bytes(read_local_image(Path(name), settings.fetch.max_bytes))


def _print_results(results: list[ClassifyResult], as_json: bool) -> None:
    for result in results:
        if as_json:
            print(json.dumps(_as_dict(result)))
        elif result.error:
            print(f"{result.image}\tERROR {result.error}")
        else:
            assert result.labels is not None
            shown = ", ".join(f"{label} {score:.3f}" for label, score in result.labels.labels)
            print(f"{result.image}\t{shown}")
    sys.stdout.flush()


def _as_dict(result: ClassifyResult) -> dict[str, object]:
    if result.error:
        return {"image": result.image, "error": result.error.as_dict()}
    assert result.labels is not None
    selected = result.labels.selected
    return {
        "image": result.image,
        "taxonomy": result.labels.taxonomy.model_dump(),
        "labels": [{"label": label, "score": score} for label, score in result.labels.labels],
        "mode": "single_label" if selected is None else "multi_label",
        "selected": None if selected is None else [{"label": label, "score": score} for label, score in selected],
    }
