"""The one place where input offsets are committed.

Order, always: (1) produce every output of the finished inputs, (2) wait for
the broker to acknowledge all of them (acks=all), (3) mark those inputs
finished, (4) commit, per partition, the lowest offset still unfinished (that
is, `offset + 1` of the last contiguous finished input). If (2) fails nothing
is committed, so the inputs are read again after a restart: at-least-once.
"""

from __future__ import annotations

from kafka import KafkaConsumer
from kafka.structs import OffsetAndMetadata

from consumers.offsets import OffsetTracker
from consumers.publisher import OutputPublisher
from consumers.records import Outcome


class Checkpoint:
    def __init__(self, consumer: KafkaConsumer, publisher: OutputPublisher, tracker: OffsetTracker) -> None:
        self._consumer = consumer
        self._publisher = publisher
        self._tracker = tracker

    def commit(self, outcomes: list[Outcome]) -> int:
        """Publish, confirm, commit. Returns how many outcomes were published."""
        current = [o for o in outcomes if self._tracker.is_current(o.item.ticket)]
        # Outcomes of revoked partitions are dropped: the new owner reprocesses them.
        for outcome in current:
            self._publisher.publish(outcome)
        self._publisher.wait_for_acks()
        for outcome in current:
            self._tracker.finish(outcome.item.ticket)
        offsets = self._tracker.committable()
        if offsets:
            self._consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()})
            self._tracker.mark_committed(offsets)
        return len(current)
