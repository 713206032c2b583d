"""Prometheus metrics. Defined once here so every stage counts the same way."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS_CONSUMED = Counter("labelstream_requests_consumed_total", "Records read from the requests topic")
REQUESTS_LABELLED = Counter("labelstream_requests_labelled_total", "Requests that produced a label record", ["taxonomy"])
REQUESTS_FAILED = Counter(
    "labelstream_requests_failed_total", "Requests that ended without a label, by error code", ["code", "stage"]
)
BATCH_SIZE = Histogram("labelstream_batch_size", "Images per model call", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
STAGE_SECONDS = Histogram(
    "labelstream_stage_seconds",
    "Time spent per item in each stage",
    ["stage"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
IN_FLIGHT = Gauge("labelstream_in_flight", "Inputs read but not yet committed")
MODEL_LOAD_SECONDS = Gauge("labelstream_model_load_seconds", "Time to load the model")
CLASSIFIER_BUILD_SECONDS = Gauge(
    "labelstream_classifier_build_seconds", "Time to build a taxonomy's text classifier", ["taxonomy"]
)

# Taxonomies: the on-disk classifier cache, and live updates (files or the taxonomies topic).
CLASSIFIER_CACHE_HITS = Counter(
    "labelstream_classifier_cache_hits_total", "Classifiers loaded from the on-disk cache", ["taxonomy"]
)
CLASSIFIER_BUILDS = Counter(
    "labelstream_classifier_builds_total", "Classifiers whose text features were computed", ["taxonomy"]
)
TAXONOMY_UPDATES = Counter(
    "labelstream_taxonomy_updates_total",
    "Taxonomy updates by origin (file, kafka) and outcome (loaded, unchanged, rejected, removed)",
    ["origin", "outcome"],
)

# Content-hash dedupe (pipeline/dedupe.py): hit rate = hits / (hits + misses).
DEDUPE_HITS = Counter("labelstream_dedupe_hits_total", "Images found in the content-hash cache (decode and model skipped)")
DEDUPE_MISSES = Counter("labelstream_dedupe_misses_total", "Images not in the content-hash cache")
DEDUPE_ENTRIES = Gauge("labelstream_dedupe_entries", "Images held in the content-hash cache")
