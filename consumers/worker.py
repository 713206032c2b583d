"""The consume loop.

Threads: the main thread polls Kafka, validates requests, publishes and
commits; a pool fetches, decodes and preprocesses (retrying transient
failures); the inference engine's thread (pipeline/inference.py) runs the
model on micro-batches, shared with the HTTP API when it runs in the same
process. The main thread never waits on S3 or the model, so a slow batch
cannot push the consumer past `max_poll_interval_ms`.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor

import structlog
from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from consumers.checkpoint import Checkpoint
from consumers.circuit_breaker import CircuitOpenError, DeadLetterGate
from consumers.intake import parse_requests
from consumers.stage_waits import StageWaits
from consumers.offsets import OffsetTracker
from consumers.publish_retry import PublishRetry
from consumers.publisher import OutputPublisher
from consumers.records import Outcome, WorkItem
from consumers.sinks import Sinks
from pipeline import metrics
from pipeline.health import HealthState
from pipeline.config import Settings
from pipeline.errors import LabelstreamError, PublishError
from pipeline.fetch import ImageFetcher
from pipeline.inference import ImageJob, InferenceEngine, JobResult, unexpected
from pipeline.labeler import Labeler
from pipeline.retry import RetryOutcome, call_with_retries

log = structlog.get_logger("labelstream.worker")


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self._worker.on_revoked(list(revoked))

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self._worker.on_assigned(list(assigned))

    def on_partitions_lost(self, lost: list[TopicPartition]) -> None:
        self._worker.on_lost(list(lost))


class Worker:
    def __init__(
        self,
        settings: Settings,
        labeler: Labeler,
        fetcher: ImageFetcher,
        consumer: KafkaConsumer,
        publisher: OutputPublisher,
        health: HealthState | None = None,
        engine: InferenceEngine | None = None,
        sinks: Sinks | None = None,
    ) -> None:
        self.settings = settings
        self.health = health or HealthState.from_settings(settings.health)
        self.waits = StageWaits()
        self.labeler = labeler
        self.fetcher = fetcher
        self.consumer = consumer
        self.tracker = OffsetTracker()
        self.checkpoint = Checkpoint(consumer, publisher, self.tracker, settings.delivery == "exactly_once", sinks)
        self.gate = DeadLetterGate(settings.dead_letter)
        self._done: queue.Queue[Outcome] = queue.Queue()
        # Items submitted to the prepare pool and not yet queued for the model or failed; lets
        # the engine send a batch at once when nothing more is on its way.
        self._preparing = 0
        self._preparing_lock = threading.Lock()
        # A shared engine (`run --http`) is started and stopped by its owner; otherwise the worker owns one.
        self._owns_engine = engine is None
        self.engine = engine or InferenceEngine(labeler, settings, self.health)
        self.engine.watch(lambda: self._preparing > 0, lambda seconds: self.waits.waited("infer", seconds))
        self._lag_updated_at = 0.0
        self._pool = ThreadPoolExecutor(settings.fetch.threads, thread_name_prefix="prepare")
        self._stop = threading.Event()
        self._halt = threading.Event()
        self._paused = False
        self._last_commit = 0.0
        self._unpublished: list[Outcome] = []
        self._publish_retry = PublishRetry(settings.retry)
        # Inputs admitted whose outcome the poll thread has not collected yet.
        self._outstanding = 0
        # Set where raising is not possible (inside a rebalance callback); raised by the poll loop.
        self._fatal: PublishError | None = None
        # Set once run() is over: the rebalance callbacks of consumer.close() must commit nothing more.
        self._closed = False
        # The revoke callback blocks kafka-python's IO thread, heartbeats included:
        # never for more than half the session timeout, or the group would evict us.
        self._revoke_timeout_s = min(settings.worker.revoke_timeout_s, settings.kafka.session_timeout_ms / 2000)

    # -- lifecycle -----------------------------------------------------------

    def request_stop(self) -> None:
        self.health.stopping()
        self._stop.set()

    def run(self) -> bool:
        """Consume until stopped. True if everything in flight was committed.

        Raises CircuitOpenError when the dead-letter breaker trips, and
        PublishError when outputs cannot be published within the budget.
        """
        self.consumer.subscribe([self.settings.topics.requests], listener=_Rebalance(self))
        if self._owns_engine:
            self.engine.start()
        log.info("worker_started", topic=self.settings.topics.requests, group=self.settings.kafka.group_id,
                 delivery=self.settings.delivery)
        try:
            while not self._stop.is_set():
                self._poll_once()
                self._checkpoint_if_due()
                self._raise_if_failed()
                self.waits.report_if_due()
            return self._drain(self.settings.worker.drain_timeout_s)
        finally:
            self._closed = True
            self._halt.set()
            if self._owns_engine:
                self.engine.stop()
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _drain(self, timeout_s: float) -> bool:
        """Finish what is in flight and commit it; abandon the rest after the timeout."""
        log.info("draining", in_flight=self.tracker.in_flight_count(), timeout_s=timeout_s)
        self._pause_all()
        deadline = time.monotonic() + timeout_s
        while self.tracker.in_flight_count() and time.monotonic() < deadline and not self.gate.tripped:
            self.health.poll_loop_tick()
            self.consumer.poll(timeout_ms=50, max_records=1)
            self._checkpoint(force=True, release_held=True)
            self._raise_if_failed()
        # Every manifest row still buffered goes into its file now, so its offset can be committed.
        self._checkpoint(force=True, release_held=True, roll=self.tracker.partitions())
        self._raise_if_failed()
        abandoned = self.tracker.in_flight_count()
        unwritten = self.checkpoint.buffered_rows()
        log.info("drained", abandoned=abandoned, manifest_rows_unwritten=unwritten)
        return abandoned == 0 and unwritten == 0

    def _raise_if_failed(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        if self.gate.tripped:
            self._finish_before_open_circuit()

    def _finish_before_open_circuit(self) -> None:
        """Commit the good work that came before the poison (bounded by the drain timeout), then stop.

        The gate lets through only outcomes below the first held dead letter
        of their partition, so nothing past the last good message is committed.
        """
        reason = self.gate.trip_reason or "circuit open"
        log.warning("circuit_opening", reason=reason, waiting=self._outstanding, held=self.gate.held_count())
        self._pause_all()
        deadline = time.monotonic() + self.settings.worker.drain_timeout_s
        while self._outstanding and time.monotonic() < deadline and self._fatal is None:
            self.health.poll_loop_tick()
            self.consumer.poll(timeout_ms=50, max_records=1)
            self._checkpoint(force=True)
        self._checkpoint(force=True)
        raise CircuitOpenError(reason)

    # -- the poll thread ----------------------------------------------------

    def _poll_once(self) -> None:
        # Read-but-uncommitted, not merely unfinished: that is what a crash reprocesses.
        capacity = self.settings.worker.max_in_flight - self.tracker.uncommitted_count()
        self._apply_backpressure(capacity)
        timeout_ms = self.settings.worker.poll_timeout_ms
        self.health.poll_loop_tick()
        started = time.perf_counter()
        # max_records bounds what one poll admits, so in-flight work never exceeds the limit.
        batches = self.consumer.poll(timeout_ms=timeout_ms, max_records=max(capacity, 1))
        if not batches:
            self.waits.waited("poll", time.perf_counter() - started)
        for records in batches.values():
            for record in records:
                self._admit(record)
        metrics.IN_FLIGHT.set(self.tracker.in_flight_count())
        self._update_lag()

    def _update_lag(self) -> None:
        """Consumer lag per assigned partition, at most once a second."""
        now = time.monotonic()
        if now - self._lag_updated_at < 1.0:
            return
        self._lag_updated_at = now
        lags = {}
        for tp in self.consumer.assignment():
            highwater = self.consumer.highwater(tp)
            position = self.tracker.position(tp)
            if highwater is not None and position is not None:
                lags[(tp.topic, tp.partition)] = max(highwater - position, 0)
        metrics.set_consumer_lag(lags)

    def _admit(self, record: ConsumerRecord) -> None:
        metrics.REQUESTS_CONSUMED.inc()
        self._outstanding += 1
        ticket = self.tracker.start(TopicPartition(record.topic, record.partition), record.offset)
        item = WorkItem(
            ticket=ticket,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=record.key,
            value=record.value,
            timestamp_ms=record.timestamp,
            headers=list(record.headers or []),
            log=log.bind(topic=record.topic, partition=record.partition, offset=record.offset),
        )
        try:
            requests = parse_requests(record.value, self.settings.fetch.max_inline_bytes)
        except LabelstreamError as exc:
            self._done.put(Outcome(item, error=exc))
            return
        # An S3 event may name several objects: one request each, one offset for all.
        self.tracker.add_parts(ticket, len(requests))
        self._outstanding += len(requests) - 1
        for request in requests:
            self._dispatch(dataclasses.replace(item, request=request, log=item.log.bind(id=request.id)))

    def _dispatch(self, item: WorkItem) -> None:
        assert item.request is not None
        try:
            item.classifier = self.labeler.classifier_for(item.request.taxonomy)
        except LabelstreamError as exc:
            self._done.put(Outcome(item, error=exc))
            return
        with self._preparing_lock:
            self._preparing += 1
        self._pool.submit(self._prepare, item, time.perf_counter())

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

    # -- publishing and committing --------------------------------------------

    def _checkpoint_if_due(self) -> None:
        interval = self.settings.worker.commit_interval_ms / 1000.0
        if time.monotonic() - self._last_commit >= interval:
            self._checkpoint(force=False)

    def _checkpoint(
        self, force: bool, release_held: bool = False, in_rebalance: bool = False, roll: Collection[TopicPartition] = ()
    ) -> None:
        """Hand finished outcomes to the Checkpoint; keep them for later if the broker is unreachable.

        Never raises: it also runs inside rebalance callbacks, where kafka-python
        would swallow the exception. Failures are left in `_fatal` for the poll loop.
        """
        self._last_commit = time.monotonic()
        self._unpublished.extend(self.gate.admit(self._take_done()))
        if release_held:
            self._unpublished.extend(self.gate.release_all())
        # A commit that failed (rebalance, broker away) is retried even with no new outcomes:
        # otherwise a paused worker would wait forever for outcomes that only the commit unblocks.
        pending = self._unpublished or force or self.tracker.committable()
        if not pending or not self._publish_retry.due() or self._fatal:
            return
        outcomes, self._unpublished = self._unpublished, []
        started = time.perf_counter()
        try:
            with self.health.working("publish"):
                self.checkpoint.commit(outcomes, in_rebalance=in_rebalance, roll=roll)
        except PublishError as exc:
            self._unpublished = outcomes + self._unpublished
            self._fatal = self._publish_retry.failed(exc, waiting=len(self._unpublished))
            return
        except Exception as exc:  # noqa: BLE001 - a bug here must stop the worker, not strand outcomes
            self._unpublished = outcomes + self._unpublished
            self._fatal = PublishError(f"checkpoint failed: {type(exc).__name__}: {exc}", retryable=False)
            log.exception("checkpoint_failed")
            return
        self._publish_retry.succeeded()
        metrics.IN_FLIGHT.set(self.tracker.in_flight_count())
        self._observe_published(outcomes, time.perf_counter() - started)

    def _observe_published(self, outcomes: list[Outcome], seconds: float) -> None:
        for outcome in outcomes:
            metrics.observe_stage("publish", seconds)
            metrics.observe_end_to_end(outcome.item.timestamp_ms)
        self.waits.completed(len(outcomes))

    def _take_done(self) -> list[Outcome]:
        outcomes = []
        while True:
            try:
                outcomes.append(self._done.get_nowait())
            except queue.Empty:
                self._outstanding -= len(outcomes)
                return outcomes

    # -- rebalance callbacks ----------------------------------------------------
    # kafka-python 3 runs these on its IO thread while the poll thread waits
    # inside poll(), so they never race the poll thread. A blocking consumer
    # call in them raises, and they hold up heartbeats while they run.

    def on_revoked(self, revoked: list[TopicPartition]) -> None:
        """Let the revoked partitions' work finish for a bounded time, commit, then let go.

        What has not finished by then is abandoned: its outputs are never
        produced, and the new owner reads it again from the committed offset.
        """
        if self._closed:
            # After the drain, what is left was abandoned on purpose.
            self.tracker.revoke(revoked)
            self.checkpoint.forget(revoked)
            return
        deadline = time.monotonic() + self._revoke_timeout_s
        while self.tracker.in_flight_for(revoked) and time.monotonic() < deadline:
            self._checkpoint(force=False, release_held=True, in_rebalance=True)
            time.sleep(0.02)
        # Manifest rows of the revoked partitions are written now when their rolls can be; the rest are
        # dropped uncommitted, and the new owner rolls them into the same files.
        self._checkpoint(force=True, release_held=True, in_rebalance=True, roll=revoked)
        abandoned = self.tracker.in_flight_for(revoked)
        self.tracker.revoke(revoked)
        self.checkpoint.forget(revoked)
        self.health.partitions_removed(revoked)
        log.info("partitions_revoked", partitions=_names(revoked), abandoned=abandoned)

    def on_lost(self, lost: list[TopicPartition]) -> None:
        # We were evicted: another member may already own these, so commit (and write) nothing for them.
        self.tracker.revoke(lost)
        self.checkpoint.forget(lost)
        self.health.partitions_removed(lost)
        log.warning("partitions_lost", partitions=_names(lost))

    def on_assigned(self, assigned: list[TopicPartition]) -> None:
        self.tracker.assign(assigned)
        self.health.partitions_added(assigned)
        if self._paused:
            self.consumer.pause(*assigned)
        log.info("partitions_assigned", partitions=_names(assigned))

    # -- the prepare pool ----------------------------------------------------

    def _prepare(self, item: WorkItem, submitted: float) -> None:
        self.waits.waited("prepare", time.perf_counter() - submitted)
        try:
            with self.health.working("prepare"):
                outcome = self._prepare_item(item)
            if outcome is None:
                self._submit_to_model(item)
            else:
                self._done.put(outcome)
        finally:
            # Only once the item is queued for the model: a forming batch may wait for it until then.
            with self._preparing_lock:
                self._preparing -= 1

    def _prepare_item(self, item: WorkItem) -> Outcome | None:
        """Fetch, decode, preprocess with retries; an Outcome if the item needs no model call."""
        assert item.request is not None and item.classifier is not None
        request, classifier = item.request, item.classifier
        try:
            item.prepared, _ = call_with_retries(
                lambda: self.labeler.prepare_deduplicated(request.image, self.fetcher, classifier),
                self.settings.retry,
                cancelled=self._halt,
                on_retry=lambda exc, attempt, delay: item.log.info(
                    "retrying", code=exc.code, attempt=attempt, backoff_s=round(delay, 3)),
            )
        except RetryOutcome as stopped:
            return Outcome(item, error=stopped.error, attempts=stopped.attempts)
        except Exception as exc:  # noqa: BLE001 - nothing may vanish silently
            return Outcome(item, error=unexpected(exc, "decode"))
        metrics.observe_stage("fetch", item.prepared.fetch_ms / 1000.0)
        if item.prepared.cached is not None:
            return Outcome(item, labels=item.prepared.cached, cache_hit=True)
        metrics.observe_stage("decode", item.prepared.decode_ms / 1000.0)
        return None

    # -- handing prepared items to the inference engine ------------------------

    def _submit_to_model(self, item: WorkItem) -> None:
        assert item.prepared is not None and item.prepared.pixels is not None and item.classifier is not None
        job = ImageJob(item.prepared.pixels, item.classifier, "kafka", done=lambda result: self._model_done(item, result),
                       content_key=item.prepared.content_key)
        self.engine.submit(job, stop=self._halt)

    def _model_done(self, item: WorkItem, result: JobResult) -> None:
        if result.error is not None:
            self._done.put(Outcome(item, error=result.error))
        else:
            self._done.put(Outcome(item, labels=result.labels))


def _names(partitions: list[TopicPartition]) -> list[str]:
    return [f"{tp.topic}:{tp.partition}" for tp in partitions]

