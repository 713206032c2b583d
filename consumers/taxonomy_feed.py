"""Following the compacted taxonomies topic, so a fleet of workers changes taxonomy together.

Records are keyed by taxonomy name; the value is the YAML or JSON document,
and a tombstone (no value) stops serving that name (never the default). Every
worker reads the whole topic on its own, outside any consumer group: each
must see every record, and compaction keeps the latest document per name.
At start-up the feed catches up before the worker consumes requests, so a
taxonomy that only exists on the topic is served from the first request.
"""

from __future__ import annotations

import threading
import time

import structlog
from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError

from consumers.kafka_clients import build_reader
from pipeline.classifier_cache import ClassifierCache
from pipeline.config import KafkaSettings, Settings
from pipeline.labeler import Labeler
from consumers.route_topics import RouteTopicCheck
from pipeline.taxonomy_reload import TaxonomyReloader

log = structlog.get_logger("labelstream.taxonomy")

_POLL_TIMEOUT_MS = 500


def build_feed_consumer(settings: KafkaSettings) -> KafkaConsumer:
    return build_reader(settings, "taxonomies", auto_offset_reset="earliest")


class TaxonomyFeed:
    def __init__(self, consumer: KafkaConsumer, topic: str, reloader: TaxonomyReloader, retry_s: float = 2.0) -> None:
        self.consumer = consumer
        self.topic = topic
        self.reloader = reloader
        self.retry_s = retry_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._assigned = False
        self._catch_up_timeout_s = 15.0
        self._waiting_logged = False

    def start(self, catch_up_timeout_s: float = 15.0) -> None:
        self._catch_up_timeout_s = catch_up_timeout_s
        self._catch_up()
        self._thread = threading.Thread(target=self._follow, name="taxonomy-feed", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
        # Closing from here is safe only once the feed thread has let go of the consumer.
        if self._thread is None or not self._thread.is_alive():
            self.consumer.close()

    # -- catching up -------------------------------------------------------------

    def _catch_up(self) -> bool:
        """Apply the latest document per name already on the topic; False while the topic does not exist.

        Runs at start-up and again if the topic only appears later, so an old
        version of a name is never applied on the way to its latest one.
        """
        try:
            if not self._assign():
                return False
            latest = self._read_backlog(time.monotonic() + self._catch_up_timeout_s)
        except KafkaError as exc:
            log.warning("taxonomy_feed_error", topic=self.topic, error=str(exc), phase="catch_up")
            self._assigned = False
            return False
        for name, value in latest.items():
            self._apply(name, value)
        log.info("taxonomy_feed_caught_up", topic=self.topic, documents=len(latest))
        return True

    def _read_backlog(self, deadline: float) -> dict[str, bytes | None]:
        # Without compaction (or before it runs) a name can appear many times:
        # only its last document matters, so build each taxonomy once.
        # end_offsets may undercount on some brokers; what it misses arrives in `_follow`.
        ends = self.consumer.end_offsets(list(self.consumer.assignment()))
        latest: dict[str, bytes | None] = {}
        while time.monotonic() < deadline and any(self.consumer.position(tp) < end for tp, end in ends.items()):
            for records in self.consumer.poll(timeout_ms=_POLL_TIMEOUT_MS).values():
                latest.update((_name(r), r.value) for r in records if r.key is not None)
        return latest

    # -- steady state ------------------------------------------------------------

    def _follow(self) -> None:
        while not self._stop.is_set():
            try:
                self._follow_once()
            except KafkaError as exc:
                log.warning("taxonomy_feed_error", topic=self.topic, error=str(exc))
                self._stop.wait(self.retry_s)

    def _follow_once(self) -> None:
        if not self._assigned and not self._catch_up():
            self._stop.wait(self.retry_s)
            return
        for records in self.consumer.poll(timeout_ms=_POLL_TIMEOUT_MS).values():
            for record in records:
                self._handle(record)

    def _assign(self) -> bool:
        partitions = self.consumer.partitions_for_topic(self.topic)
        if not partitions:
            if not self._waiting_logged:  # once, not every retry
                log.info("taxonomy_feed_waiting", topic=self.topic, reason="topic not found")
                self._waiting_logged = True
            return False
        assignment = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        self.consumer.assign(assignment)
        self.consumer.seek_to_beginning(*assignment)
        self._assigned = True
        log.info("taxonomy_feed_assigned", topic=self.topic, partitions=len(assignment))
        return True

    def _handle(self, record: ConsumerRecord) -> None:
        if record.key is None:
            log.warning("taxonomy_rejected", file=f"{self.topic}@{record.partition}:{record.offset}",
                        error="record has no key; the key must be the taxonomy name")
            return
        self._apply(_name(record), record.value, f"{self.topic}@{record.partition}:{record.offset}")

    def _apply(self, name: str, value: bytes | None, source: str | None = None) -> None:
        source = source or f"{self.topic}[{name}]"
        if value is None:
            self.reloader.remove_document(name)
            return
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            log.error("taxonomy_rejected", file=source, taxonomy=name, error=f"value is not UTF-8: {exc}")
            return
        self.reloader.apply_document(name, text, source=source)


def _name(record: ConsumerRecord) -> str:
    return record.key.decode("utf-8", errors="replace")


class TaxonomyUpdates:
    """The file watcher and the topic feed of one worker, started and stopped together."""

    def __init__(self, reloader: TaxonomyReloader, feed: TaxonomyFeed | None, route_check: RouteTopicCheck) -> None:
        self.reloader = reloader
        self.feed = feed
        self.route_check = route_check

    def stop(self) -> None:
        if self.feed is not None:
            self.feed.stop()
        self.reloader.stop()
        self.route_check.close()


def start_taxonomy_updates(settings: Settings, labeler: Labeler) -> TaxonomyUpdates:
    """Catch up with the taxonomies topic, then keep following it and the files in the background."""
    cache = ClassifierCache(settings.taxonomy.cache_dir)
    route_check = RouteTopicCheck(settings.kafka)
    reloader = TaxonomyReloader(labeler.model, labeler.registry, cache, settings.taxonomy, admit=route_check)
    feed = None
    if settings.taxonomy.feed_enabled:
        consumer = build_feed_consumer(settings.kafka)
        feed = TaxonomyFeed(consumer, settings.topics.taxonomies, reloader, retry_s=max(settings.taxonomy.watch_interval_s, 1.0))
        feed.start()
    reloader.start()
    return TaxonomyUpdates(reloader, feed, route_check)
