"""`labelstream eval`: measure a taxonomy on labelled images, with the worker's own engine."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog

from labelstream.evaluation import dataset as datasets
from labelstream.evaluation.calibration import DEFAULT_REVIEW_RECALL, Target, write_thresholds
from labelstream.evaluation.compare import compare_hits
from labelstream.evaluation.embedding_cache import EmbeddingCache, default_cache_dir
from labelstream.evaluation.metrics import topk_hits
from labelstream.evaluation.results import Evaluation, evaluate
from labelstream.evaluation.runner import EncodeOutcome, load_or_encode, read_image_bytes, score_embeddings
from labelstream.logs import configure_logging
from pipeline.classifier import ZeroShotClassifier
from pipeline.config import Settings, load_settings
from pipeline.errors import ConfigError
from pipeline.fetch import ImageFetcher
from pipeline.labeler import Labeler, build_labeler
from pipeline.taxonomy import Taxonomy, resolve_taxonomy

log = structlog.get_logger("labelstream.eval")
_MAX_LISTED_FAILURES = 100


@dataclass(frozen=True)
class EvalOptions:
    dataset: str
    taxonomy: Path | None = None
    label_map: Path | None = None
    json_out: Path | None = None
    report: Path | None = None
    compare: Path | None = None
    target: Target | None = None
    review_recall: float = DEFAULT_REVIEW_RECALL
    write_thresholds: Path | None = None
    cache_dir: Path | None = None
    no_cache: bool = False
    config: Path | None = None


@dataclass(frozen=True)
class Labelled:
    """The dataset with its classes resolved against one taxonomy."""

    dataset: datasets.Dataset
    mapping: dict[str, str]
    warnings: list[str]


def run_eval(options: EvalOptions) -> int:
    settings = eval_settings(load_settings(options.config), options.taxonomy)
    configure_logging(settings.log)
    taxonomy = resolve_taxonomy(options.taxonomy)
    if options.write_thresholds and options.target is None:
        raise ConfigError("--write-thresholds needs --target-precision or --target-recall", code="eval.no_target")
    labelled = resolve_dataset(options, settings, taxonomy)
    labeler = build_labeler(settings)
    fetcher = ImageFetcher(settings.s3, settings.fetch)
    cache = EmbeddingCache(None if options.no_cache else options.cache_dir or default_cache_dir())
    outcome = load_or_encode(labeler, fetcher, settings, labelled.dataset, cache)
    classifier = labeler.classifier_for(None)
    evaluation = evaluate_classifier(classifier, labelled, outcome, options)
    output = assemble_output(options, labeler, labelled, outcome, evaluation)
    if options.compare is not None:
        output["compare"] = compare_with(options, labeler, settings, labelled.dataset, outcome, evaluation)
    if options.write_thresholds is not None:
        output["written_taxonomy"] = _write_thresholds(options, taxonomy, evaluation, labeler)
    _emit(options, output, evaluation, settings, fetcher)
    return 0


def eval_settings(settings: Settings, taxonomy: Path | None) -> Settings:
    """The configured settings serving exactly the taxonomy under test (the built-in ImageNet one without a file)."""
    update = {"path": taxonomy, "files": (), "dir": None, "default": None}
    return settings.model_copy(update={"taxonomy": settings.taxonomy.model_copy(update=update)})


def resolve_dataset(options: EvalOptions, settings: Settings, taxonomy: Taxonomy) -> Labelled:
    from labelstream.submit import s3_client

    client = s3_client(settings.s3) if options.dataset.startswith("s3://") else None
    dataset = datasets.load_dataset(options.dataset, client)
    explicit = datasets.load_label_map(options.label_map) if options.label_map else {}
    mapping = datasets.class_mapping(dataset.classes, taxonomy.class_names, explicit)
    missing = datasets.classes_without_images(mapping, taxonomy.class_names)
    warnings = [f"{len(missing)} taxonomy classes have no images: {_shorten(missing)}"] if missing else []
    for warning in warnings:
        log.warning("eval_classes_without_images", count=len(missing), classes=_shorten(missing))
    return Labelled(dataset, mapping, warnings)


def _shorten(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def evaluate_classifier(
    classifier: ZeroShotClassifier, labelled: Labelled, outcome: EncodeOutcome, options: EvalOptions
) -> Evaluation:
    ok = outcome.encoded.ok
    taxonomy = classifier.taxonomy
    truth = datasets.truth_matrix(labelled.dataset, labelled.mapping, taxonomy.class_names)[ok]
    scores = score_embeddings(classifier, outcome.encoded.embeddings[ok])
    locations = [s.location for s, good in zip(labelled.dataset.samples, ok, strict=True) if good]
    return evaluate(
        taxonomy, classifier.version, locations, truth, scores,
        labelled.dataset.is_multi_label, options.target, options.review_recall,
    )


def assemble_output(
    options: EvalOptions, labeler: Labeler, labelled: Labelled, outcome: EncodeOutcome, evaluation: Evaluation
) -> dict[str, object]:
    errors = outcome.encoded.errors
    failed = [{"image": s.location, "code": e} for s, e in zip(labelled.dataset.samples, errors, strict=True) if e]
    return {
        **evaluation.summary,
        "dataset": labelled.dataset.source,
        "model": {**labeler.model.ref.model_dump(), "identity": labeler.model.identity},
        "n_failed": len(failed),
        "failed": failed[:_MAX_LISTED_FAILURES],
        "warnings": labelled.warnings,
        "compare": None,
        "written_taxonomy": None,
        "embedding_cache": {
            "hit": outcome.cache_hit, "images_encoded": outcome.images_encoded, "seconds": round(outcome.seconds, 3),
        },
    }


def compare_with(
    options: EvalOptions, labeler: Labeler, settings: Settings, dataset: datasets.Dataset,
    outcome: EncodeOutcome, evaluation: Evaluation,
) -> dict[str, object]:
    """Score the other (baseline) taxonomy on the same embeddings and test the paired top-1 hits."""
    from pipeline.classifier_cache import ClassifierCache, load_or_build

    other = resolve_taxonomy(options.compare)
    explicit = datasets.load_label_map(options.label_map) if options.label_map else {}
    mapping = datasets.class_mapping(dataset.classes, other.class_names, explicit)
    classifier = load_or_build(labeler.model, other, ClassifierCache(settings.taxonomy.cache_dir))
    ok = outcome.encoded.ok
    truth = datasets.truth_matrix(dataset, mapping, other.class_names)[ok]
    hits_other = topk_hits(score_embeddings(classifier, outcome.encoded.embeddings[ok]), truth, 1)
    hits_this = topk_hits(evaluation.scores, evaluation.truth, 1)
    # The question is "did my change help?": --compare names the old taxonomy, --taxonomy the new one.
    return compare_hits(str(options.compare), str(options.taxonomy or "imagenet1k"), hits_other, hits_this).as_json()


def _write_thresholds(options: EvalOptions, taxonomy: Taxonomy, evaluation: Evaluation, labeler: Labeler) -> dict[str, str]:
    assert options.write_thresholds is not None and evaluation.thresholds is not None
    if options.taxonomy is None:
        raise ConfigError("--write-thresholds needs --taxonomy FILE (the built-in taxonomy is single_label)", code="eval.no_taxonomy")
    written = write_thresholds(options.taxonomy, taxonomy, evaluation.thresholds, options.write_thresholds)
    return {"path": str(options.write_thresholds), "version": written.version(labeler.model.identity)}


def _emit(options: EvalOptions, output: dict[str, object], evaluation: Evaluation, settings: Settings, fetcher: ImageFetcher) -> None:
    from labelstream.evaluation.console import print_summary

    if options.json_out is not None:
        options.json_out.write_text(json.dumps(output, indent=2, default=_json_default) + "\n", encoding="utf-8")
    if options.report is not None:
        from labelstream.evaluation.report import write_report

        def thumbnails(location: str) -> bytes:
            return read_image_bytes(location, fetcher, settings.fetch.max_bytes)

        write_report(evaluation, thumbnails, options.report, output)
    print_summary(output, sys.stdout)


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
