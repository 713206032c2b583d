"""The one place where input offsets are committed.

At-least-once, always in this order:
  1. produce every output of the finished inputs (labels, embeddings, dead letters);
  2. wait until the broker acknowledges all of them (acks=all);
  3. mark those inputs finished;
  4. commit, per partition, the lowest offset still unfinished, which is
     `offset + 1` of the last contiguous finished input.
If 2 fails nothing is committed and the caller publishes again later; if the
worker dies first, the inputs are read again after a restart. If 4 fails
(the group is rebalancing, the broker is away), the same offsets are
committable again at the next checkpoint. Inside a rebalance callback, step
4 is an asynchronous commit (kafka-python runs callbacks on its IO thread).

Exactly-once does the same inside one transaction: begin, produce, hand the
offsets of step 4 to the transaction (`send_offsets_to_transaction` with the
consumer's group metadata), commit the transaction. The outputs and the input
offsets become visible to `read_committed` readers together, or not at all.
"""

from __future__ import annotations

import time

import structlog
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import (
    CommitFailedError,
    InvalidProducerEpochError,
    KafkaError,
    ProducerFencedError,
    TransactionalIdAuthorizationFailedError,
)
from kafka.structs import OffsetAndMetadata

from consumers.offsets import OffsetTracker
from consumers.publisher import OutputPublisher
from consumers.records import Outcome
from pipeline.errors import PublishError

log = structlog.get_logger("labelstream.checkpoint")

_FAILURE_LOG_INTERVAL_S = 5.0
# After these the producer can never commit again; retrying would only spin.
_FATAL_TRANSACTION_ERRORS = (ProducerFencedError, InvalidProducerEpochError, TransactionalIdAuthorizationFailedError)


class Checkpoint:
    def __init__(
        self, consumer: KafkaConsumer, publisher: OutputPublisher, tracker: OffsetTracker, exactly_once: bool
    ) -> None:
        self._consumer = consumer
        self._publisher = publisher
        self._tracker = tracker
        self._exactly_once = exactly_once
        self._abort_pending = False
        self._commit_failures = 0
        self._last_failure_logged = 0.0

    def commit(self, outcomes: list[Outcome], in_rebalance: bool = False) -> int:
        """Publish, confirm, commit. Returns how many outcomes were published.

        Raises PublishError if the outputs were not confirmed; nothing is then
        committed and the same outcomes may be passed again. `in_rebalance`
        says the caller is a rebalance callback on kafka-python's IO thread.
        """
        # Outcomes of revoked partitions are dropped: the new owner reprocesses them.
        current = [o for o in outcomes if self._tracker.is_current(o.item.ticket)]
        if self._exactly_once:
            self._commit_transaction(current)
        else:
            self._commit_after_acks(current, in_rebalance)
        return len(current)

    def _commit_after_acks(self, outcomes: list[Outcome], in_rebalance: bool) -> None:
        for outcome in outcomes:
            self._publisher.publish(outcome)
        self._publisher.wait_for_acks()
        for outcome in outcomes:
            self._tracker.finish(outcome.item.ticket)
        offsets = self._tracker.committable()
        if offsets and in_rebalance:
            self._commit_offsets_in_rebalance(offsets)
        elif offsets:
            self._commit_offsets(offsets)

    def _commit_offsets_in_rebalance(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit from a rebalance callback, where kafka-python refuses a blocking commit.

        The asynchronous commit is queued on the coordinator connection before
        the JoinGroup that hands the partitions over, so the new owner starts
        from it. The offsets are not marked committed: partitions we keep are
        committed again, blocking, from the poll thread; a failure only means
        the new owner repeats some work.
        """
        self._consumer.commit_async(_offsets_and_metadata(offsets), callback=_log_failed_async_commit)

    def _commit_offsets(self, offsets: dict[TopicPartition, int]) -> None:
        try:
            self._consumer.commit(_offsets_and_metadata(offsets))
        except CommitFailedError as exc:
            # The group rebalanced under us: the outputs are out, the new owner
            # will reprocess from its last commit. Duplicates, never loss.
            self._commit_failed("commit_failed_rebalance", exc)
            return
        except KafkaError as exc:
            # A rebalance in progress, or the broker is unreachable. The inputs are
            # finished, so the same offsets come back from `committable()` next time.
            self._commit_failed("commit_failed", exc)
            return
        self._commit_failures = 0
        self._tracker.mark_committed(offsets)

    def _commit_failed(self, event: str, exc: KafkaError) -> None:
        # Retried at every checkpoint (a rebalance on Tansu takes seconds): log a streak, not each try.
        self._commit_failures += 1
        now = time.monotonic()
        if self._commit_failures == 1 or now - self._last_failure_logged >= _FAILURE_LOG_INTERVAL_S:
            self._last_failure_logged = now
            log.warning(event, error=str(exc), failures=self._commit_failures)

    def _commit_transaction(self, outcomes: list[Outcome]) -> None:
        tickets = [o.item.ticket for o in outcomes]
        offsets = self._tracker.committable_if_finished(tickets)
        if not outcomes and not offsets:
            return
        producer = self._publisher.producer
        if self._abort_pending:
            self._abort(producer)
        try:
            producer.begin_transaction()
            for outcome in outcomes:
                self._publisher.publish(outcome)
            if offsets:
                producer.send_offsets_to_transaction(_offsets_and_metadata(offsets), self._consumer.group_metadata())
            producer.commit_transaction()
        except _FATAL_TRANSACTION_ERRORS as exc:
            # Another instance with our transactional id took over: this one
            # must stop; its open transaction is aborted by the broker.
            raise PublishError(f"transactional producer fenced: {exc}", retryable=False) from exc
        except KafkaError as exc:
            self._abort(producer)
            raise PublishError(f"transaction failed: {exc}", retryable=True) from exc
        self._publisher.confirm()
        for ticket in tickets:
            self._tracker.finish(ticket)
        self._tracker.mark_committed(offsets)

    def _abort(self, producer: KafkaProducer) -> None:
        """Abort the open transaction; if the broker is unreachable, try again before the next one."""
        self._publisher.discard_pending()
        try:
            producer.abort_transaction()
        except KafkaError as exc:
            self._abort_pending = True
            log.warning("abort_transaction_failed", error=str(exc))
            return
        self._abort_pending = False


def _offsets_and_metadata(offsets: dict[TopicPartition, int]) -> dict[TopicPartition, OffsetAndMetadata]:
    return {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()}


def _log_failed_async_commit(offsets: dict[TopicPartition, OffsetAndMetadata], response: object) -> None:
    if isinstance(response, Exception):
        log.warning("commit_failed_rebalance", error=str(response), partitions=len(offsets))
