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

The dataset sinks (consumers/sinks.py) fit around these steps: object tags are
written before step 1 (a failure retries the whole checkpoint; tags are
idempotent), and between 3 and 4 the manifest buffers the finished rows,
writes the rolls that are due, and caps each partition's offset at the first
row not yet in a written file, so no offset is committed before its file is.

Exactly-once does the same inside one transaction: begin, produce, hand the
offsets of step 4 to the transaction (`send_offsets_to_transaction` with the
consumer's group metadata), commit the transaction. The outputs and the input
offsets become visible to `read_committed` readers together, or not at all.
Manifest files are written before the transaction commits; if it aborts, the
sinks roll the same offset ranges into the same files when it is retried.
"""

from __future__ import annotations

import time
from collections.abc import Collection

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
from consumers.sinks import Sinks
from pipeline.errors import PublishError

log = structlog.get_logger("labelstream.checkpoint")

_FAILURE_LOG_INTERVAL_S = 5.0
# Reading the committed offset of a newly assigned partition (once, for the manifest's rolls).
_COMMITTED_LOOKUP_TIMEOUT_MS = 5_000
# After these the producer can never commit again; retrying would only spin.
_FATAL_TRANSACTION_ERRORS = (ProducerFencedError, InvalidProducerEpochError, TransactionalIdAuthorizationFailedError)


class Checkpoint:
    def __init__(
        self,
        consumer: KafkaConsumer,
        publisher: OutputPublisher,
        tracker: OffsetTracker,
        exactly_once: bool,
        sinks: Sinks | None = None,
    ) -> None:
        self._consumer = consumer
        self._publisher = publisher
        self._tracker = tracker
        self._exactly_once = exactly_once
        self._abort_pending = False
        self._commit_failures = 0
        self._last_failure_logged = 0.0
        self._sinks = sinks or Sinks()

    def commit(self, outcomes: list[Outcome], in_rebalance: bool = False, roll: Collection[TopicPartition] = ()) -> int:
        """Publish, confirm, commit. Returns how many outcomes were published.

        Raises PublishError if the outputs were not confirmed; nothing is then
        committed and the same outcomes may be passed again. `in_rebalance`
        says the caller is a rebalance callback on kafka-python's IO thread.
        `roll` names partitions whose manifest rows must be written now (drain, revocation).
        """
        # Outcomes of revoked partitions are dropped: the new owner reprocesses them.
        current = [o for o in outcomes if self._tracker.is_current(o.item.ticket)]
        self._sinks.write_tags(current)
        if self._exactly_once:
            self._commit_transaction(current, roll, in_rebalance)
        else:
            self._commit_after_acks(current, in_rebalance, roll)
        return len(current)

    def forget(self, partitions: list[TopicPartition]) -> None:
        """The partitions were revoked or lost: their buffered manifest rows are the new owner's to redo."""
        self._sinks.forget(partitions)

    def buffered_rows(self) -> int:
        """Manifest rows not yet in a written file (their offsets are not committed)."""
        return self._sinks.buffered_rows()

    def _staged(
        self, outcomes: list[Outcome], offsets: dict[TopicPartition, int], roll: Collection[TopicPartition],
        in_rebalance: bool,
    ) -> dict[TopicPartition, int]:
        """The sinks' capped offsets, less those already committed."""
        # A blocking consumer call raises inside a rebalance callback.
        committed = None if in_rebalance else self._committed_offset
        capped = self._sinks.stage(outcomes, offsets, roll, committed)
        # The tracker keeps offering the uncapped position; the capped one, once
        # committed, must not turn into a commit every interval.
        return {tp: offset for tp, offset in capped.items() if self._tracker.committed(tp) != offset}

    def _committed_offset(self, tp: TopicPartition) -> int | None:
        """The group's committed offset of `tp`, bounded in time: the poll thread must come back."""
        return self._consumer.committed(tp, timeout_ms=_COMMITTED_LOOKUP_TIMEOUT_MS)

    def _commit_after_acks(self, outcomes: list[Outcome], in_rebalance: bool, roll: Collection[TopicPartition]) -> None:
        for outcome in outcomes:
            self._publisher.publish(outcome)
        self._publisher.wait_for_acks()
        for outcome in outcomes:
            self._tracker.finish(outcome.item.ticket)
        offsets = self._staged(outcomes, self._tracker.committable(), roll, in_rebalance)
        # Written files stay written: a failed commit below is retried with the same offsets.
        self._sinks.confirm()
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

    def _commit_transaction(
        self, outcomes: list[Outcome], roll: Collection[TopicPartition], in_rebalance: bool
    ) -> None:
        tickets = [o.item.ticket for o in outcomes]
        # Manifest files are written here, before the transaction that commits their offsets.
        offsets = self._staged(outcomes, self._tracker.committable_if_finished(tickets), roll, in_rebalance)
        if not outcomes:
            self._commit_offsets_only(offsets, in_rebalance)
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
            self._sinks.rollback()
            raise PublishError(f"transactional producer fenced: {exc}", retryable=False) from exc
        except KafkaError as exc:
            self._abort(producer)
            self._sinks.rollback()
            raise PublishError(f"transaction failed: {exc}", retryable=True) from exc
        except PublishError:
            # Raised by the publisher itself (e.g. a route topic the broker does not know):
            # abort now rather than leave the transaction open until the broker times it out.
            self._abort(producer)
            self._sinks.rollback()
            raise
        self._publisher.confirm()
        self._sinks.confirm()
        for ticket in tickets:
            self._tracker.finish(ticket)
        self._tracker.mark_committed(offsets)

    def _commit_offsets_only(self, offsets: dict[TopicPartition, int], in_rebalance: bool) -> None:
        """Offsets that advanced with no new output: the manifest wrote the rows of inputs whose records
        went out in earlier transactions. A transaction would hold nothing but these offsets, so they
        are committed directly (Tansu 0.6.0 also ignores the offsets of a transaction without records)."""
        self._sinks.confirm()
        if offsets and in_rebalance:
            self._commit_offsets_in_rebalance(offsets)
        elif offsets:
            self._commit_offsets(offsets)

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
