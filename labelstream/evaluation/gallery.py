"""`labelstream gallery`: what is the stream labelling today? An HTML gallery of recent label records.

There is no ground truth here; the gallery is for looking. It reads the
labels topic from `--since` ago (offsets_for_times, then a timestamp filter,
with no consumer group so nothing is committed) and shows a sample per top
label, the lowest-confidence records and the score distribution per label.

Where the image is: a label record carries no image reference of its own,
only the request's `id` and `metadata`. The rule, in order:
1. `metadata["s3_uri"]` when it is an s3:// URI (`labelstream submit` always sets it);
2. the record `id` when it is an s3:// URI (`labelstream submit` uses the URI as the id);
3. otherwise no thumbnail: the record is still counted and captioned.
Producers of requests other than `labelstream submit` should put `s3_uri`
in the request metadata to get thumbnails.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import structlog
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from pydantic import ValidationError

from labelstream.evaluation.report import GalleryItem, ThumbnailSource, esc, gallery, note, page, table
from labelstream.evaluation.runner import read_image_bytes
from labelstream.logs import configure_logging
from labelstream.sources import is_s3_uri
from pipeline.config import KafkaSettings, load_settings
from pipeline.errors import ConfigError, FetchError
from pipeline.fetch import ImageFetcher
from schemas.labels import LabelRecord

log = structlog.get_logger("labelstream.gallery")

MAX_LABELS = 24
LOWEST_SHOWN = 12


@dataclass(frozen=True)
class GalleryOptions:
    topic: str | None
    since_s: float
    report: Path
    max_records: int = 10_000
    per_label: int = 6
    idle_timeout_s: float = 3.0
    config: Path | None = None


@dataclass(frozen=True)
class StreamRecord:
    label: LabelRecord
    timestamp_ms: int

    @property
    def top(self) -> tuple[str, float]:
        first = self.label.labels[0]
        return first.label, first.score


def image_location(record: LabelRecord) -> str | None:
    """Where the record's image is, by the rule in the module docstring."""
    uri = record.metadata.get("s3_uri")
    if isinstance(uri, str) and is_s3_uri(uri):
        return uri
    return record.id if is_s3_uri(record.id) else None


def run_gallery(options: GalleryOptions) -> int:
    settings = load_settings(options.config)
    configure_logging(settings.log)
    topic = options.topic or settings.topics.labels
    since_ms = int((time.time() - options.since_s) * 1000)
    records = read_recent(settings.kafka, topic, since_ms, options.max_records, options.idle_timeout_s)
    fetcher = ImageFetcher(settings.s3, settings.fetch)

    def thumbnails(location: str) -> bytes:
        return read_image_bytes(location, fetcher, settings.fetch.max_bytes)

    html = render_gallery(records, topic, since_ms, options.per_label, thumbnails)
    options.report.write_text(html, encoding="utf-8")
    print(f"{len(records)} label records from {topic} since {_when(since_ms)}; wrote {options.report}")
    return 0


def read_recent(kafka: KafkaSettings, topic: str, since_ms: int, max_records: int, idle_timeout_s: float) -> list[StreamRecord]:
    consumer = _reader(kafka)
    try:
        partitions = _start_at(consumer, topic, since_ms)
        return _drain(consumer, since_ms, max_records, idle_timeout_s) if partitions else []
    finally:
        consumer.close()


def _reader(kafka: KafkaSettings) -> KafkaConsumer:
    from consumers.kafka_clients import build_reader

    return build_reader(kafka, "gallery")


def _start_at(consumer: KafkaConsumer, topic: str, since_ms: int) -> list[TopicPartition]:
    """Assign the partitions that have records since `since_ms` and seek each to its first such record."""
    ids = consumer.partitions_for_topic(topic)
    if not ids:
        raise ConfigError(f"topic {topic} does not exist or has no partitions", code="gallery.unknown_topic")
    partitions = [TopicPartition(topic, p) for p in sorted(ids)]
    try:
        found = consumer.offsets_for_times({tp: since_ms for tp in partitions})
    except KafkaError as exc:
        # A broker without ListOffsets by time: read from the start, the timestamp filter still applies.
        log.warning("gallery_offsets_for_times_failed", error=str(exc))
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        return partitions
    # Kafka answers None for a partition with nothing that recent; Tansu answers offset 0 with
    # timestamp -1 instead, which reads the partition from the start: the timestamp filter in
    # _drain keeps the result right either way.
    starting = {tp: found[tp].offset for tp in partitions if found.get(tp) is not None}
    consumer.assign(list(starting))
    for tp, offset in starting.items():
        consumer.seek(tp, offset)
    return list(starting)


def _drain(consumer: KafkaConsumer, since_ms: int, max_records: int, idle_timeout_s: float) -> list[StreamRecord]:
    """Read until `idle_timeout_s` passes without a record (end offsets are not trusted) or `max_records`."""
    records: list[StreamRecord] = []
    skipped = 0
    last_seen = time.monotonic()
    while len(records) < max_records and time.monotonic() - last_seen < idle_timeout_s:
        batches = consumer.poll(timeout_ms=250, max_records=500)
        for message in (m for batch in batches.values() for m in batch):
            last_seen = time.monotonic()
            parsed = _parse(message.value)
            if parsed is None:
                skipped += 1
            elif message.timestamp >= since_ms:
                records.append(StreamRecord(parsed, message.timestamp))
    if skipped:
        log.warning("gallery_records_skipped", count=skipped, reason="not a label record")
    return records[:max_records]


def _parse(value: bytes | None) -> LabelRecord | None:
    if value is None:
        return None
    try:
        record = LabelRecord.model_validate_json(value)
    except ValidationError:
        return None
    return record if record.labels else None


def render_gallery(
    records: list[StreamRecord], topic: str, since_ms: int, per_label: int, thumbnails: ThumbnailSource
) -> str:
    by_label: dict[str, list[StreamRecord]] = defaultdict(list)
    for record in records:
        by_label[record.top[0]].append(record)
    labels = sorted(by_label, key=lambda name: (-len(by_label[name]), name))
    sections = [
        _summary(records, topic, since_ms, labels),
        _distribution(by_label, labels),
        _lowest(records, thumbnails),
        _samples(by_label, labels, per_label, thumbnails),
    ]
    return page(f"labelstream live gallery: {topic}", sections)


def _summary(records: list[StreamRecord], topic: str, since_ms: int, labels: list[str]) -> str:
    located = sum(image_location(r.label) is not None for r in records)
    rows = [["topic", topic], ["since", _when(since_ms)], ["label records", len(records)],
            ["distinct top labels", len(labels)], ["records with an image location", located]]
    rule = ("Thumbnails come from the record's metadata s3_uri, else its id when that is an s3:// URI; "
            "records with neither are counted but shown without an image.")
    return "<h2>Summary</h2>" + table(["", "value"], rows) + note(rule)


def _distribution(by_label: dict[str, list[StreamRecord]], labels: list[str]) -> str:
    if not labels:
        return "<h2>Score distribution per label</h2>" + note("No label records in this window.")
    from labelstream.evaluation.plots import score_histograms

    shown = labels[:MAX_LABELS]
    uri = score_histograms({name: np.array([r.top[1] for r in by_label[name]]) for name in shown})
    limit = note(f"{len(labels)} labels: showing the {len(shown)} most frequent.") if len(shown) < len(labels) else ""
    return f'<h2>Score distribution per label</h2>{limit}<img class="plot" src="{uri}" alt="score histograms">'


def _lowest(records: list[StreamRecord], thumbnails: ThumbnailSource) -> str:
    lowest = sorted(records, key=lambda r: r.top[1])[:LOWEST_SHOWN]
    return "<h2>Lowest-confidence records</h2>" + gallery([_item(r) for r in lowest], _located(thumbnails))


def _samples(by_label: dict[str, list[StreamRecord]], labels: list[str], per_label: int, thumbnails: ThumbnailSource) -> str:
    parts = ["<h2>Sample per label</h2>"]
    if len(labels) > MAX_LABELS:
        parts.append(note(f"{len(labels)} labels: showing the {MAX_LABELS} most frequent."))
    rng = random.Random(0)
    for name in labels[:MAX_LABELS]:
        chosen = rng.sample(by_label[name], min(per_label, len(by_label[name])))
        parts.append(f"<h3>{esc(name)} ({len(by_label[name])} records)</h3>")
        parts.append(gallery([_item(r) for r in chosen], _located(thumbnails)))
    return "".join(parts)


def _item(record: StreamRecord) -> GalleryItem:
    scores = ", ".join(f"{s.label} {s.score:.3f}" for s in record.label.labels[:3])
    location = image_location(record.label) or ""
    caption = f"{Path(location).name or record.label.id} | {scores} | {record.label.taxonomy.name} | {_when(record.timestamp_ms)}"
    return GalleryItem(location, caption)


def _located(thumbnails: ThumbnailSource) -> ThumbnailSource:
    """Records without an image location get no thumbnail instead of a fetch error."""

    def fetch(location: str) -> bytes:
        if not location:
            raise FetchError("label record has no image location", code="gallery.no_location")
        return thumbnails(location)

    return fetch


def _when(timestamp_ms: int) -> str:
    return datetime.fromtimestamp(timestamp_ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
