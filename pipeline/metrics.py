"""Prometheus metrics. Defined once here so every stage counts the same way."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping

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
# Moderation triage (pipeline/routing.py): counted once the broker has the routed record.
ROUTED = Counter("labelstream_routed_total", "Label records sent to a route topic, by taxonomy and rule", ["taxonomy", "route"])
UNROUTED = Counter(
    "labelstream_unrouted_total", "Label records of a taxonomy with routes that no rule matched", ["taxonomy"]
)

# Content-hash dedupe (pipeline/dedupe.py): hit rate = hits / (hits + misses).
DEDUPE_HITS = Counter("labelstream_dedupe_hits_total", "Images found in the content-hash cache (decode and model skipped)")
DEDUPE_MISSES = Counter("labelstream_dedupe_misses_total", "Images not in the content-hash cache")
DEDUPE_ENTRIES = Gauge("labelstream_dedupe_entries", "Images held in the content-hash cache")

# Operations: lag, dead letters and the per-stage latencies, with the helpers the worker calls.
# STAGE_SECONDS's `stage` label takes exactly these values, one observation per item:
#   fetch       reading the image bytes (S3, URL or inline), retries included
#   decode      decoding and preprocessing into the model's input tensor
#   infer       the model call of the batch the item was in
#   publish     producing the item's outputs until the broker acknowledged them
#   end_to_end  from the request record's Kafka timestamp to its outputs being acknowledged
STAGES = ("fetch", "decode", "infer", "publish", "end_to_end")
CONSUMER_LAG = Gauge(
    "labelstream_consumer_lag",
    "Records after the consumer's position in each assigned partition (high watermark - position)",
    ["topic", "partition"],
)
DEAD_LETTERS = Counter(
    "labelstream_dead_letters_total",
    "Inputs written to the dead-letter topic, by error code and the taxonomy the request resolved to ('' if none)",
    ["code", "taxonomy"],
)

_lag_lock = threading.Lock()
_lag_labels: set[tuple[str, str]] = set()


def observe_stage(stage: str, seconds: float) -> None:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    STAGE_SECONDS.labels(stage=stage).observe(max(seconds, 0.0))


def observe_end_to_end(record_timestamp_ms: int | None, now_s: float | None = None) -> None:
    """Record timestamps come from the producer's clock; skew below zero counts as zero."""
    if record_timestamp_ms is None or record_timestamp_ms < 0:
        return
    now = time.time() if now_s is None else now_s
    observe_stage("end_to_end", now - record_timestamp_ms / 1000.0)


def set_consumer_lag(lags: Mapping[tuple[str, int], int]) -> None:
    """Set the lag of every assigned partition; partitions no longer given lose their series."""
    current = {(topic, str(partition)): max(lag, 0) for (topic, partition), lag in lags.items()}
    with _lag_lock:
        for gone in _lag_labels - current.keys():
            CONSUMER_LAG.remove(*gone)
        for labels, lag in current.items():
            CONSUMER_LAG.labels(*labels).set(lag)
        _lag_labels.clear()
        _lag_labels.update(current)

STAGE_WAIT_SECONDS = Histogram(
    "labelstream_stage_wait_seconds",
    "Time a stage spent waiting for work (poll: for records; prepare: in the pool queue; "
    "infer: for a batch; publish: for broker acknowledgements)",
    ["stage"],
    buckets=(0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)

# Shared batching (pipeline/inference.py) and the HTTP API (api/): proof that both paths feed one model.
BATCH_ITEMS = Counter("labelstream_batch_items_total", "Items sent to the model, by where they came from", ["source"])
MIXED_BATCHES = Counter("labelstream_mixed_batches_total", "Model batches holding both HTTP and Kafka items")
DROPPED_JOBS = Counter(
    "labelstream_inference_dropped_total", "Queued items dropped before the model because their caller went away",
    ["source"],
)
QUEUE_SECONDS = Histogram(
    "labelstream_inference_queue_seconds",
    "Time an item waited between being queued for the model and its batch starting, by source",
    ["source"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
HTTP_QUEUE_DEPTH = Gauge("labelstream_http_queue_depth", "HTTP items waiting for the model")
HTTP_REQUESTS = Counter("labelstream_http_requests_total", "HTTP API requests by path and status", ["path", "status"])
HTTP_SECONDS = Histogram(
    "labelstream_http_request_seconds",
    "HTTP API request latency by path",
    ["path"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)

# Dataset sinks (consumers/tag_sink.py, consumers/manifest_sink.py; docs/dataset-sinks.md).
OBJECT_TAG_WRITES = Counter(
    "labelstream_object_tag_writes_total",
    "Label records handled by the S3 object-tag sink, by result (written, unchanged, not_s3, not_found, "
    "access_denied, failed)",
    ["result"],
)
OBJECT_TAGS_DROPPED = Counter(
    "labelstream_object_tags_dropped_total",
    "Tags left out or cut short to respect S3's tag limits, by reason (pipeline/object_tags.py DROP_REASONS)",
    ["reason"],
)
MANIFEST_FILES = Counter("labelstream_manifest_files_total", "Parquet manifest files written", ["taxonomy"])
MANIFEST_ROWS = Counter("labelstream_manifest_rows_total", "Rows written to Parquet manifest files", ["taxonomy"])
MANIFEST_BYTES = Counter("labelstream_manifest_bytes_total", "Bytes of Parquet manifest files written")
MANIFEST_ROLL_SECONDS = Histogram(
    "labelstream_manifest_roll_seconds",
    "Time to write one roll (its marker and every file of its offset range)",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
MANIFEST_BUFFERED_ROWS = Gauge("labelstream_manifest_buffered_rows", "Label records waiting for their manifest roll")
