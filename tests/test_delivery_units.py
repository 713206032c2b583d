"""The delivery building blocks on their own: offsets, the dead-letter gate, retries, dead-letter headers.

Pure logic is driven directly; the dead-letter record goes through the real
broker, because what matters is that its headers survive the Kafka protocol.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import structlog
from kafka import KafkaProducer, TopicPartition
from worker_process import OutputCollector

from consumers.circuit_breaker import DeadLetterGate
from consumers.offsets import OffsetTracker, Ticket
from consumers.publish_retry import PublishRetry
from consumers.publisher import VALUE_OMITTED_HEADER, OutputPublisher
from consumers.records import Outcome, WorkItem
from pipeline.config import DeadLetterSettings, RetrySettings, TopicSettings
from pipeline.errors import FetchError, ImageError, LabelstreamError, PublishError, RequestError
from pipeline.labeler import ImageLabels
from pipeline.retry import RetryOutcome, backoff_seconds, call_with_retries
from schemas.deadletter import HEADER_PREFIX, DeadLetterHeaders
from schemas.labels import ModelRef, TaxonomyRef

TP0 = TopicPartition("requests", 0)
TP1 = TopicPartition("requests", 1)


# -- OffsetTracker --------------------------------------------------------------------------


def started(tracker: OffsetTracker, tp: TopicPartition, offsets: range) -> dict[int, Ticket]:
    tracker.assign([tp])
    return {offset: tracker.start(tp, offset) for offset in offsets}


def test_committable_if_finished_predicts_committable_without_changing_state() -> None:
    tracker = OffsetTracker()
    tickets = started(tracker, TP0, range(5))

    assert tracker.committable_if_finished([tickets[0], tickets[1], tickets[3]]) == {TP0: 2}
    assert tracker.in_flight_count() == 5, "a prediction must not finish anything"
    assert tracker.committable_if_finished([tickets[3]]) == tracker.committable() == {TP0: 0}

    for offset in (0, 1, 3):
        tracker.finish(tickets[offset])
    assert tracker.committable() == {TP0: 2}


def test_committable_if_finished_covers_all_partitions_and_skips_what_is_committed() -> None:
    tracker = OffsetTracker()
    p0 = started(tracker, TP0, range(3))
    p1 = started(tracker, TP1, range(10, 12))
    for ticket in p1.values():
        tracker.finish(ticket)

    # TP1 advanced on its own; finishing TP0's first input advances TP0 too.
    assert tracker.committable_if_finished([p0[0]]) == {TP0: 1, TP1: 12}
    tracker.mark_committed({TP0: 0, TP1: 12})
    assert tracker.committable_if_finished([p0[0]]) == {TP0: 1}
    assert tracker.committable_if_finished([]) == {}


def test_committable_if_finished_ignores_tickets_of_a_revoked_assignment() -> None:
    tracker = OffsetTracker()
    old = started(tracker, TP0, range(2))
    tracker.revoke([TP0])
    new = started(tracker, TP0, range(2))

    # The old owner's late finish must not move the new assignment's position.
    assert tracker.committable_if_finished([old[0], old[1]]) == tracker.committable() == {TP0: 0}
    assert tracker.committable_if_finished([new[0], new[1]]) == {TP0: 2}


def test_uncommitted_count_includes_finished_inputs_blocked_behind_a_slow_one() -> None:
    tracker = OffsetTracker()
    tickets = started(tracker, TP0, range(100, 110))
    for offset in range(101, 110):
        tracker.finish(tickets[offset])

    assert tracker.in_flight_count() == 1
    # All ten are read again after a crash, so all ten count against the in-flight limit.
    assert tracker.uncommitted_count() == 10

    tracker.finish(tickets[100])
    tracker.mark_committed(tracker.committable())
    assert tracker.uncommitted_count() == 0


# -- DeadLetterGate ---------------------------------------------------------------------------

_LOG = structlog.get_logger("test")


def outcome(offset: int, failed: bool, partition: int = 0) -> Outcome:
    tp = TopicPartition("requests", partition)
    item = WorkItem(ticket=Ticket(tp, offset, 1), topic=tp.topic, partition=partition, offset=offset, key=b"k",
                    value=b"v", timestamp_ms=0, headers=[], log=_LOG)
    if failed:
        return Outcome(item, error=RequestError("bad", code="request.invalid_json", stage="parse"))
    labels = ImageLabels(embedding=np.zeros(4, dtype=np.float32), labels=[("cat", 1.0)],
                         taxonomy=TaxonomyRef(name="t", version="v"), infer_ms=1.0)
    return Outcome(item, labels=labels)


def gate(**overrides: Any) -> DeadLetterGate:
    settings = {"max_consecutive": 3, "max_ratio": 0.5, "window": 10, "min_messages": 6, "hold_timeout_s": 60.0}
    return DeadLetterGate(DeadLetterSettings(**{**settings, **overrides}))


def offsets(outcomes: list[Outcome]) -> list[int]:
    return [o.item.offset for o in outcomes]


def test_n_dead_letters_in_a_row_trip_the_gate_and_stay_held() -> None:
    breaker = gate(max_consecutive=3)
    assert offsets(breaker.admit([outcome(0, False), outcome(1, True), outcome(2, True)])) == [0]
    assert not breaker.tripped
    assert breaker.admit([outcome(3, True)]) == []
    assert breaker.tripped
    assert "3 dead letters in a row" in (breaker.trip_reason or "")
    assert breaker.held_count() == 3


def test_a_good_outcome_resets_the_run_and_releases_the_held_dead_letters_before_itself() -> None:
    breaker = gate(max_consecutive=3)
    assert breaker.admit([outcome(0, True), outcome(1, True)]) == []
    assert offsets(breaker.admit([outcome(2, False)])) == [0, 1, 2]
    assert breaker.admit([outcome(3, True), outcome(4, True)]) == []
    assert not breaker.tripped


def test_the_ratio_trips_only_after_min_messages() -> None:
    breaker = gate(max_consecutive=100, max_ratio=0.5, window=10, min_messages=6)
    pattern = [True, True, False, True, True]  # 4 of 5 dead-lettered: over the ratio, under min_messages
    breaker.admit([outcome(i, failed) for i, failed in enumerate(pattern)])
    assert not breaker.tripped
    breaker.admit([outcome(5, True)])
    assert breaker.tripped
    assert "5 of the last 6" in (breaker.trip_reason or "")


def test_the_ratio_forgets_outcomes_older_than_the_window() -> None:
    breaker = gate(max_consecutive=100, max_ratio=0.5, window=6, min_messages=6)
    breaker.admit([outcome(i, True) for i in range(3)] + [outcome(i, False) for i in range(3, 9)])
    breaker.admit([outcome(9, True), outcome(10, True)])  # 2 of the last 6
    assert not breaker.tripped


def test_held_dead_letters_are_released_after_the_hold_timeout() -> None:
    breaker = gate(hold_timeout_s=0.2)
    assert breaker.admit([outcome(0, True)]) == []
    assert breaker.admit([]) == []
    time.sleep(0.25)
    assert offsets(breaker.admit([])) == [0]
    assert breaker.held_count() == 0


def test_release_all_hands_over_the_held_run_but_not_once_tripped() -> None:
    breaker = gate(max_consecutive=3)
    breaker.admit([outcome(0, True), outcome(1, True)])
    assert offsets(breaker.release_all()) == [0, 1]
    assert breaker.release_all() == []

    breaker.admit([outcome(2, True), outcome(3, True), outcome(4, True)])
    assert breaker.tripped
    assert breaker.release_all() == []


def test_once_tripped_only_good_work_from_before_the_first_held_dead_letter_passes() -> None:
    breaker = gate(max_consecutive=2)
    breaker.admit([outcome(10, True), outcome(11, True)])
    assert breaker.tripped
    # 9 was read before the poison (a slow image finishing late); 12 after it.
    released = breaker.admit([outcome(9, False), outcome(12, False), outcome(13, True), outcome(5, False, partition=1)])
    assert [(o.item.partition, o.item.offset) for o in released] == [(0, 9), (1, 5)]
    assert breaker.held_count() == 3


# -- retries -------------------------------------------------------------------------------------


def retry_settings(**overrides: Any) -> RetrySettings:
    return RetrySettings(**{"initial_backoff_ms": 10, "max_backoff_ms": 40, "budget_s": 0.5, **overrides})


def test_backoff_is_full_jitter_under_an_exponential_ceiling_capped_at_max() -> None:
    settings = RetrySettings(initial_backoff_ms=100, max_backoff_ms=1000)
    rng = random.Random(7)
    for attempt, ceiling in [(0, 0.1), (1, 0.2), (2, 0.4), (3, 0.8), (4, 1.0), (40, 1.0)]:
        delays = [backoff_seconds(attempt, settings, rng) for _ in range(300)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert max(delays) > 0.8 * ceiling, "jitter should use the whole range"
        assert min(delays) < 0.2 * ceiling


class Flaky:
    """Fails with the given errors in turn, then returns "ok"."""

    def __init__(self, *errors: LabelstreamError) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def transient() -> FetchError:
    return FetchError("503", code="s3.unavailable", retryable=True)


def test_transient_failures_are_retried_and_attempts_counted() -> None:
    operation = Flaky(transient(), transient())
    retried: list[tuple[str, int]] = []
    result = call_with_retries(operation, retry_settings(), on_retry=lambda e, n, d: retried.append((e.code, n)))
    assert result == ("ok", 3)
    assert retried == [("s3.unavailable", 1), ("s3.unavailable", 2)]


def test_permanent_failures_are_not_retried() -> None:
    operation = Flaky(ImageError("truncated", code="image.truncated"))
    with pytest.raises(RetryOutcome) as stopped:
        call_with_retries(operation, retry_settings())
    assert operation.calls == 1
    assert stopped.value.attempts == 1
    assert stopped.value.error.code == "image.truncated"


def test_retrying_stops_when_the_budget_is_spent() -> None:
    operation = Flaky(*[transient() for _ in range(1000)])
    began = time.monotonic()
    with pytest.raises(RetryOutcome) as stopped:
        call_with_retries(operation, retry_settings(budget_s=0.3))
    assert time.monotonic() - began <= 0.3 + 0.1
    assert stopped.value.attempts == operation.calls > 3
    assert stopped.value.error.retryable


def test_cancelling_stops_a_retry_in_its_backoff() -> None:
    cancelled = threading.Event()
    operation = Flaky(*[transient() for _ in range(1000)])
    threading.Timer(0.2, cancelled.set).start()
    began = time.monotonic()
    with pytest.raises(RetryOutcome) as stopped:
        call_with_retries(operation, retry_settings(initial_backoff_ms=5000, max_backoff_ms=5000, budget_s=60),
                          cancelled=cancelled)
    assert time.monotonic() - began < 2.0
    assert stopped.value.error.code == "s3.unavailable"


def test_unexpected_exceptions_are_not_swallowed() -> None:
    def broken() -> None:
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        call_with_retries(broken, retry_settings())


# -- dead-letter headers over the wire ---------------------------------------------------------------


def test_dead_letter_headers_round_trip_through_kafka_headers() -> None:
    headers = DeadLetterHeaders(
        original_topic="requests", original_partition=3, original_offset=42, original_timestamp=1_700_000_000_000,
        consumer_group="labelstream", stage="fetch", error_code="s3.not_found", error_message="no such key: é ✓",
        retryable=False, attempts=4, request_id="req-1",
    )
    encoded = headers.to_kafka_headers()
    assert all(name.startswith(HEADER_PREFIX) and isinstance(value, bytes) for name, value in encoded)
    assert dict(encoded)[f"{HEADER_PREFIX}original-offset"] == b"42"
    assert dict(encoded)[f"{HEADER_PREFIX}retryable"] == b"false"
    # Foreign headers next to ours are ignored.
    assert DeadLetterHeaders.from_kafka_headers([("trace", b"x"), *encoded]) == headers

    # A record whose request could not be parsed has no id: the header is left out, not sent empty.
    anonymous = headers.model_copy(update={"request_id": None})
    assert not any(name.endswith("request-id") for name, _ in anonymous.to_kafka_headers())
    assert DeadLetterHeaders.from_kafka_headers(anonymous.to_kafka_headers()) == anonymous


def dead_letter_as_published(bootstrap: str, dlq: str, failed: Outcome, **producer_options: Any) -> Any:
    """Publish one failed outcome through the real publisher and read back the one record it wrote."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", **producer_options)
    publisher = OutputPublisher(producer, TopicSettings(dlq=dlq), ModelRef(name="m", pretrained=None), 10.0, "grp")
    try:
        publisher.publish(failed)
        publisher.wait_for_acks()
    finally:
        producer.close(timeout=10)
    reader = OutputCollector(bootstrap, dlq)
    try:
        assert reader.read_until(lambda records: len(records) >= 1, 20)
    finally:
        reader.close()
    (record,) = reader.records
    return record


@pytest.mark.timeout(60)
def test_a_published_dead_letter_keeps_the_original_record_and_says_why(
    broker: Any, new_topic: Callable[..., str]
) -> None:
    dlq = new_topic(1)
    item = WorkItem(ticket=Ticket(TP0, 7, 1), topic="requests", partition=0, offset=7, key=b"\x00key",
                    value=b"\xff not utf-8", timestamp_ms=123, headers=[("traceparent", b"00-abc")], log=_LOG)
    failed = Outcome(item, error=RequestError("not UTF-8", code="request.not_utf8", stage="parse"), attempts=1)
    record = dead_letter_as_published(broker.bootstrap, dlq, failed)
    assert (record.key, record.value) == (b"\x00key", b"\xff not utf-8")
    assert list(record.headers)[0] == ("traceparent", b"00-abc")
    parsed = DeadLetterHeaders.from_kafka_headers(list(record.headers))
    assert parsed.model_dump() == {
        "original_topic": "requests", "original_partition": 0, "original_offset": 7, "original_timestamp": 123,
        "consumer_group": "grp", "stage": "parse", "error_code": "request.not_utf8", "error_message": "not UTF-8",
        "retryable": False, "attempts": 1, "request_id": None,
    }


@pytest.mark.timeout(60)
def test_a_dead_letter_too_big_to_resend_goes_out_without_its_value(
    broker: Any, new_topic: Callable[..., str]
) -> None:
    dlq = new_topic(1)
    item = WorkItem(ticket=Ticket(TP0, 3, 1), topic="requests", partition=0, offset=3, key=b"big",
                    value=b"x" * 10_000, timestamp_ms=1, headers=[], log=_LOG)
    failed = Outcome(item, error=RequestError("too big", code="request.too_large", stage="parse"))
    record = dead_letter_as_published(broker.bootstrap, dlq, failed, max_request_size=4000)
    assert (record.key, record.value) == (b"big", b"")
    assert dict(record.headers)[VALUE_OMITTED_HEADER] == b"10000"
    assert DeadLetterHeaders.from_kafka_headers(list(record.headers)).error_code == "request.too_large"


# -- publish retries ----------------------------------------------------------------------------


def test_publish_retry_backs_off_then_gives_up_after_the_budget_and_resets_on_success() -> None:
    retry = PublishRetry(retry_settings(initial_backoff_ms=50, max_backoff_ms=50, publish_budget_s=0.3))
    broker_away = PublishError("broker unreachable", retryable=True)
    assert retry.due()
    assert retry.failed(broker_away, waiting=3) is None
    # Full jitter: the wait is anywhere up to the 50 ms cap, never longer.
    time.sleep(0.06)
    assert retry.due()
    retry.succeeded()
    assert retry.failed(broker_away, waiting=3) is None, "success starts a fresh budget"
    time.sleep(0.35)
    fatal = retry.failed(broker_away, waiting=3)
    assert fatal is not None and "budget" in fatal.message


def test_publish_retry_gives_up_at_once_on_an_error_no_retry_can_fix() -> None:
    retry = PublishRetry(retry_settings(publish_budget_s=60))
    fatal = retry.failed(PublishError("fenced", retryable=False), waiting=1)
    assert fatal is not None and "fenced" in fatal.message
