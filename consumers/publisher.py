"""Producing the outputs of finished inputs, and confirming the broker has them.

Per labelled input: the label record, the embedding record and, when the
taxonomy's routing rules select one, a routed record on that rule's topic
(schemas/routes.py). All of them go through `publish`, so the Checkpoint
confirms (or, in exactly-once mode, commits the transaction of) every one of
them before it commits the input's offset.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError, KafkaTimeoutError, MessageSizeTooLargeError

from consumers.records import Outcome
from pipeline import metrics
from pipeline.classifier import ZeroShotClassifier
from pipeline.config import TopicSettings
from pipeline.errors import ConfigError, PublishError
from pipeline.routing import RouteMatch
from pipeline.taxonomy import Taxonomy
from schemas.deadletter import HEADER_PREFIX, DeadLetterHeaders
from schemas.embeddings import EmbeddingRecord
from schemas.labels import LabelRecord, LabelScore, ModelRef, SourceRef, Timings
from schemas.routes import PRIORITY_HEADER, ROUTE_HEADER, RoutedRecord

# On a dead letter whose original value was too big to resend: the value's size in bytes.
VALUE_OMITTED_HEADER = HEADER_PREFIX + "value-omitted"


class OutputPublisher:
    def __init__(
        self, producer: KafkaProducer, topics: TopicSettings, model: ModelRef, timeout_s: float, group_id: str
    ) -> None:
        self._producer = producer
        self._topics = topics
        self._model = model
        self._timeout_s = timeout_s
        self._group_id = group_id
        self._pending: list[Any] = []
        # What the sent records mean, counted and logged only once the broker has them:
        # a retried flush or an aborted transaction must not count twice.
        self._unconfirmed: list[Callable[[], None]] = []

    @property
    def producer(self) -> KafkaProducer:
        return self._producer

    def publish(self, outcome: Outcome) -> None:
        """Send the outcome's records; nothing is confirmed until `wait_for_acks`."""
        if outcome.labels is None:
            self._dead_letter(outcome)
            return
        item, request = outcome.item, outcome.item.request
        assert request is not None
        key = request.id.encode("utf-8")
        label = label_record(outcome, self._model)
        embedding = EmbeddingRecord.from_vector(request.id, self._model, outcome.labels.embedding)
        self._send(self._topics.labels, key, label.model_dump_json().encode("utf-8"))
        self._send(self._topics.embeddings, key, embedding.model_dump_json().encode("utf-8"))
        route = outcome.labels.route
        if route is not None:
            self._send_routed(route, key, routed_record(outcome, label, route))
        routed = item.classifier is not None and bool(item.classifier.taxonomy.route_table.rules)
        self._unconfirmed.append(lambda: _report_labelled(item.log, label, routed))

    def wait_for_acks(self) -> None:
        """Block until every record sent so far is acknowledged (acks=all), or raise."""
        pending, self._pending = self._pending, []
        try:
            self._producer.flush(timeout=self._timeout_s)
        except KafkaError as exc:
            raise PublishError(f"producer flush failed: {exc}", retryable=True) from exc
        failed = [f for f in pending if not f.is_done or f.failed()]
        if failed:
            first = failed[0]
            reason = first.exception if first.is_done else "not acknowledged in time"
            self._unconfirmed = []
            raise PublishError(f"{len(failed)} of {len(pending)} output records were not acknowledged: {reason}")
        self.confirm()

    def confirm(self) -> None:
        """The broker has everything sent so far: count it and log it."""
        reports, self._unconfirmed, self._pending = self._unconfirmed, [], []
        for report in reports:
            report()

    def discard_pending(self) -> None:
        """Forget sent-but-unconfirmed records (their transaction was aborted)."""
        self._pending = []
        self._unconfirmed = []

    def _send(self, topic: str, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]] | None = None) -> None:
        self._pending.append(self._producer.send(topic, key=key, value=value, headers=headers or []))

    def _send_routed(self, route: RouteMatch, key: bytes, record: RoutedRecord) -> None:
        try:
            self._send(route.topic, key, record.model_dump_json().encode("utf-8"), route_headers(route))
        except KafkaTimeoutError as exc:
            # kafka-python waits max_block_ms for the metadata of a topic the broker does not
            # know, then gives up: retrying would only repeat that wait forever. The start-up
            # check (require_route_topics) catches this for the taxonomies loaded at start.
            raise PublishError(
                f"route topic {route.topic!r} (route {route.rule!r}) is unknown to the broker; create it: {exc}",
                code="kafka.route_topic_missing", retryable=False,
            ) from exc

    def _dead_letter(self, outcome: Outcome) -> None:
        """The original key, value and headers, plus headers saying where from and why."""
        item, error = outcome.item, outcome.error
        assert error is not None
        headers = [*item.headers, *dead_letter_headers(outcome, self._group_id).to_kafka_headers()]
        try:
            self._send(self._topics.dlq, item.key, item.value, headers)
        except MessageSizeTooLargeError:
            # The input is bigger than this producer may send (its topic allows more): dead-letter
            # it without the value, saying so, rather than let it stall its partition for good.
            omitted = (VALUE_OMITTED_HEADER, str(len(item.value or b"")).encode())
            self._send(self._topics.dlq, item.key, b"", [*headers, omitted])
        self._unconfirmed.append(lambda: _report_dead_letter(outcome))


def _report_labelled(item_log: Any, label: LabelRecord, routed: bool) -> None:
    metrics.REQUESTS_LABELLED.labels(taxonomy=label.taxonomy.name).inc()
    if label.route is not None:
        metrics.ROUTED.labels(taxonomy=label.taxonomy.name, route=label.route).inc()
    elif routed:
        metrics.UNROUTED.labels(taxonomy=label.taxonomy.name).inc()
    item_log.info("labelled", taxonomy_version=label.taxonomy.version, timings_ms=label.timings_ms.model_dump(),
                  top=label.labels[0].label, cache_hit=label.cache_hit, outcome="labelled", route=label.route)


def _report_dead_letter(outcome: Outcome) -> None:
    item, error = outcome.item, outcome.error
    assert error is not None
    metrics.REQUESTS_FAILED.labels(code=error.code, stage=error.stage).inc()
    taxonomy = item.classifier.taxonomy.name if item.classifier is not None else ""
    metrics.DEAD_LETTERS.labels(code=error.code, taxonomy=taxonomy).inc()
    item.log.warning("dead_lettered", code=error.code, stage=error.stage, retryable=error.retryable,
                     attempts=outcome.attempts, error=error.message, outcome="dead_lettered",
                     taxonomy_version=item.classifier.version if item.classifier is not None else None,
                     timings_ms=_partial_timings(outcome))


def _partial_timings(outcome: Outcome) -> dict[str, float]:
    """The stages a failed input got through, so slow failures are visible too."""
    prepared = outcome.item.prepared
    timings = {"total": round(outcome.total_ms(), 3)}
    if prepared is not None:
        timings.update(fetch=round(prepared.fetch_ms, 3), decode=round(prepared.decode_ms, 3))
    return timings


def dead_letter_headers(outcome: Outcome, group_id: str) -> DeadLetterHeaders:
    item, error = outcome.item, outcome.error
    assert error is not None
    return DeadLetterHeaders(
        original_topic=item.topic,
        original_partition=item.partition,
        original_offset=item.offset,
        original_timestamp=item.timestamp_ms,
        consumer_group=group_id,
        stage=error.stage,
        error_code=error.code,
        error_message=error.message[:2000],
        retryable=error.retryable,
        attempts=outcome.attempts,
        request_id=item.request_id,
    )


def label_record(outcome: Outcome, model: ModelRef) -> LabelRecord:
    item, labels = outcome.item, outcome.labels
    assert item.request is not None and labels is not None and item.prepared is not None
    return LabelRecord(
        id=item.request.id,
        metadata=item.request.metadata,
        model=model,
        taxonomy=labels.taxonomy,
        labels=_scores(labels.labels),
        mode="single_label" if labels.selected is None else "multi_label",
        selected=None if labels.selected is None else _scores(labels.selected),
        cache_hit=outcome.cache_hit,
        route=None if labels.route is None else labels.route.rule,
        source=SourceRef(topic=item.topic, partition=item.partition, offset=item.offset),
        timings_ms=Timings(
            fetch=round(item.prepared.fetch_ms, 3),
            decode=round(item.prepared.decode_ms, 3),
            infer=0.0 if outcome.cache_hit else round(labels.infer_ms, 3),
            total=round(outcome.total_ms(), 3),
        ),
    )


def routed_record(outcome: Outcome, label: LabelRecord, route: RouteMatch) -> RoutedRecord:
    request = outcome.item.request
    assert request is not None
    # An inline image can be megabytes; the label record already names the request.
    image = None if request.image.base64 is not None else request.image
    return RoutedRecord(
        id=label.id, route=route.rule, condition=route.condition, priority=route.priority,
        scores=route.scores, headers=route.headers, image=image, label=label,
    )


def route_headers(route: RouteMatch) -> list[tuple[str, bytes]]:
    headers = [(ROUTE_HEADER, route.rule.encode("utf-8"))]
    if route.priority is not None:
        headers.append((PRIORITY_HEADER, str(route.priority).encode("ascii")))
    return headers + [(name, value.encode("utf-8")) for name, value in route.headers.items()]


def require_route_topics(existing: set[str], classifiers: list[ZeroShotClassifier]) -> None:
    """Refuse to start when a route topic is missing, naming each one and the rules that send to it.

    Kafka with topic auto-creation off makes every send to it wait out the
    producer's max_block_ms; Tansu (and Kafka with auto-creation on) would
    silently create it with the broker's default partitions and retention.
    """
    missing = [topic for c in classifiers for topic in missing_route_topics(existing, c.taxonomy)]
    if missing:
        raise ConfigError(f"route topics do not exist: {'; '.join(missing)}; create them before starting the worker",
                          code="config.route_topic_missing")


def missing_route_topics(existing: set[str], taxonomy: Taxonomy) -> list[str]:
    """Each route topic of `taxonomy` the broker does not have, with the rule that sends to it."""
    return [
        f"{rule.topic} (route {rule.name!r} of taxonomy {taxonomy.name!r})"
        for rule in taxonomy.route_table.rules if rule.topic not in existing
    ]


def _scores(pairs: list[tuple[str, float]]) -> list[LabelScore]:
    # Float rounding can put a softmax a hair outside [0, 1].
    return [LabelScore(label=name, score=min(max(score, 0.0), 1.0)) for name, score in pairs]


def encode_json(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")
