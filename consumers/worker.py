"""The consume loop.

Threads: the main thread polls Kafka, validates requests, publishes and
commits; a pool fetches, decodes and preprocesses; one inference thread runs
the model on micro-batches. The main thread never waits on S3 or the model,
so a slow batch cannot push the consumer past `max_poll_interval_ms`.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import structlog
from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from consumers.checkpoint import Checkpoint
from consumers.intake import parse_request
from consumers.offsets import OffsetTracker
from consumers.publisher import OutputPublisher
from consumers.records import Outcome, WorkItem
from pipeline import metrics
from pipeline.batcher import MicroBatcher
from pipeline.config import Settings
from pipeline.errors import InferenceError, LabelstreamError
from pipeline.fetch import ImageFetcher
from pipeline.labeler import Labeler

log = structlog.get_logger("labelstream.worker")


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self._worker.on_revoked(list(revoked))

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self._worker.on_assigned(list(assigned))


class Worker:
    def __init__(
        self,
        settings: Settings,
        labeler: Labeler,
        fetcher: ImageFetcher,
        consumer: KafkaConsumer,
        publisher: OutputPublisher,
    ) -> None:
        self.settings = settings
        self.labeler = labeler
        self.fetcher = fetcher
        self.consumer = consumer
        self.tracker = OffsetTracker()
        self.checkpoint = Checkpoint(consumer, publisher, self.tracker)
        self._ready: queue.Queue[WorkItem] = queue.Queue()
        self._done: queue.Queue[Outcome] = queue.Queue()
        self._batcher = MicroBatcher(self._ready, settings.batch.max_size, settings.batch.max_wait_ms)
        self._pool = ThreadPoolExecutor(settings.fetch.threads, thread_name_prefix="prepare")
        self._stop = threading.Event()
        self._inference_stop = threading.Event()
        self._paused = False
        self._last_commit = 0.0

    # -- lifecycle -----------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        self.consumer.subscribe([self.settings.topics.requests], listener=_Rebalance(self))
        inference = threading.Thread(target=self._inference_loop, name="inference", daemon=True)
        inference.start()
        log.info("worker_started", topic=self.settings.topics.requests, group=self.settings.kafka.group_id)
        try:
            while not self._stop.is_set():
                self._poll_once()
                self._checkpoint_if_due()
            self._drain(self.settings.worker.drain_timeout_s)
        finally:
            self._inference_stop.set()
            inference.join(timeout=5)
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _drain(self, timeout_s: float) -> None:
        """Finish what is in flight, commit it, and stop; give up after the timeout."""
        log.info("draining", in_flight=self.tracker.in_flight_count(), timeout_s=timeout_s)
        self._pause_all()
        deadline = time.monotonic() + timeout_s
        while self.tracker.in_flight_count() and time.monotonic() < deadline:
            self.consumer.poll(timeout_ms=50, max_records=1)
            self._checkpoint(force=True)
        self._checkpoint(force=True)
        left = self.tracker.in_flight_count()
        log.info("drained", abandoned=left)

    # -- the poll thread ----------------------------------------------------

    def _poll_once(self) -> None:
        capacity = self.settings.worker.max_in_flight - self.tracker.in_flight_count()
        self._apply_backpressure(capacity)
        if capacity <= 0:
            self.consumer.poll(timeout_ms=self.settings.worker.poll_timeout_ms, max_records=1)
            return
        batches = self.consumer.poll(timeout_ms=self.settings.worker.poll_timeout_ms, max_records=capacity)
        for records in batches.values():
            for record in records:
                self._admit(record)
        metrics.IN_FLIGHT.set(self.tracker.in_flight_count())

    def _admit(self, record: ConsumerRecord) -> None:
        metrics.REQUESTS_CONSUMED.inc()
        tp = TopicPartition(record.topic, record.partition)
        ticket = self.tracker.start(tp, record.offset)
        item = WorkItem(
            ticket=ticket,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=record.key,
            value=record.value,
            timestamp_ms=record.timestamp,
            log=log.bind(topic=record.topic, partition=record.partition, offset=record.offset),
        )
        try:
            item.request = parse_request(record.value, self.settings.fetch.max_inline_bytes)
            item.log = item.log.bind(id=item.request.id)
            item.classifier = self.labeler.classifier_for(item.request.taxonomy)
        except LabelstreamError as exc:
            self._done.put(Outcome(item, error=exc))
            return
        self._pool.submit(self._prepare, item)

    def _apply_backpressure(self, capacity: int) -> None:
        limit = self.settings.worker.max_in_flight
        if capacity <= 0 and not self._paused:
            self._pause_all()
        elif self._paused and not self._stop.is_set() and capacity >= limit // 2:
            self.consumer.resume(*self.consumer.assignment())
            self._paused = False

    def _pause_all(self) -> None:
        self.consumer.pause(*self.consumer.assignment())
        self._paused = True

    def _checkpoint_if_due(self) -> None:
        interval = self.settings.worker.commit_interval_ms / 1000.0
        if time.monotonic() - self._last_commit >= interval:
            self._checkpoint(force=False)

    def _checkpoint(self, force: bool) -> None:
        outcomes = self._take_done()
        if outcomes or force:
            self.checkpoint.commit(outcomes)
        self._last_commit = time.monotonic()
        metrics.IN_FLIGHT.set(self.tracker.in_flight_count())

    def _take_done(self) -> list[Outcome]:
        outcomes = []
        while True:
            try:
                outcomes.append(self._done.get_nowait())
            except queue.Empty:
                return outcomes

    # -- rebalance callbacks (run inside poll, on the poll thread) ------------

    def on_revoked(self, revoked: list[TopicPartition]) -> None:
        # Commit whatever is finished before the partitions move; in-flight
        # work for them is abandoned and its outputs never produced.
        self._checkpoint(force=True)
        self.tracker.revoke(revoked)
        log.info("partitions_revoked", partitions=[f"{tp.topic}:{tp.partition}" for tp in revoked])

    def on_assigned(self, assigned: list[TopicPartition]) -> None:
        self.tracker.assign(assigned)
        if self._paused:
            self.consumer.pause(*assigned)
        log.info("partitions_assigned", partitions=[f"{tp.topic}:{tp.partition}" for tp in assigned])

    # -- the prepare pool ----------------------------------------------------

    def _prepare(self, item: WorkItem) -> None:
        assert item.request is not None
        try:
            item.prepared = self.labeler.prepare(item.request.image, self.fetcher)
        except LabelstreamError as exc:
            self._done.put(Outcome(item, error=exc))
            return
        except Exception as exc:  # noqa: BLE001 - nothing may vanish silently
            self._done.put(Outcome(item, error=_unexpected(exc, "decode")))
            return
        self._ready.put(item)

    # -- the inference thread ------------------------------------------------

    def _inference_loop(self) -> None:
        while not self._inference_stop.is_set():
            batch = self._batcher.next_batch(self._inference_stop)
            if batch:
                metrics.BATCH_SIZE.observe(len(batch))
                for outcome in self._label_batch(batch):
                    self._done.put(outcome)

    def _label_batch(self, batch: list[WorkItem]) -> list[Outcome]:
        """Label a batch; on a model failure split it so one bad item fails alone."""
        try:
            pixels = [item.prepared.pixels for item in batch if item.prepared is not None]
            labels = self.labeler.label(pixels, [item.classifier for item in batch if item.classifier is not None])
        except InferenceError as exc:
            if len(batch) == 1:
                return [Outcome(batch[0], error=exc)]
            half = len(batch) // 2
            return self._label_batch(batch[:half]) + self._label_batch(batch[half:])
        except Exception as exc:  # noqa: BLE001
            return [Outcome(item, error=_unexpected(exc, "infer")) for item in batch]
        return [Outcome(item, labels=result) for item, result in zip(batch, labels, strict=True)]


def _unexpected(exc: Exception, stage: str) -> LabelstreamError:
    return LabelstreamError(f"unexpected {type(exc).__name__}: {exc}", code="internal.unexpected", stage=stage)  # type: ignore[arg-type]
