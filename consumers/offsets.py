"""Tracking which input offsets are safe to commit.

Items finish out of order (a small image overtakes a 12 MP one), so the
committable position of a partition is the lowest offset still in flight, or
one past the highest offset seen when nothing is. An offset counts as finished
only once its outputs are acknowledged by the broker.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from kafka import TopicPartition


@dataclass
class _PartitionState:
    epoch: int
    in_flight: set[int] = field(default_factory=set)
    next_offset: int | None = None
    committed: int | None = None
    # Where this assignment started reading: what the group had committed.
    first_offset: int | None = None
    # Offsets that fanned out into several requests (an S3 event with several
    # objects): how many parts beyond the first are still unfinished.
    extra_parts: dict[int, int] = field(default_factory=dict)

    def committable(self) -> int | None:
        position = min(self.in_flight) if self.in_flight else self.next_offset
        if position is None or position == self.committed:
            return None
        return position

    def uncommitted(self) -> int:
        """Offsets read but not committed: finished ones blocked behind a slow one count too."""
        if self.next_offset is None:
            return 0
        base = self.committed if self.committed is not None else self.first_offset
        return self.next_offset - (base if base is not None else self.next_offset)


@dataclass(frozen=True)
class Ticket:
    """Identifies one input in flight, tied to the assignment it came from."""

    partition: TopicPartition
    offset: int
    epoch: int


class OffsetTracker:
    def __init__(self) -> None:
        self._partitions: dict[TopicPartition, _PartitionState] = {}
        self._epoch = 0

    def assign(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            if tp not in self._partitions:
                self._epoch += 1
                self._partitions[tp] = _PartitionState(epoch=self._epoch)

    def revoke(self, partitions: list[TopicPartition]) -> None:
        """Forget partitions; tickets issued for them become stale."""
        for tp in partitions:
            self._partitions.pop(tp, None)

    def start(self, tp: TopicPartition, offset: int) -> Ticket:
        state = self._partitions.get(tp)
        if state is None:
            # poll() only returns records of assigned partitions; treat a miss as an assignment.
            self.assign([tp])
            state = self._partitions[tp]
        if state.first_offset is None:
            state.first_offset = offset
        state.in_flight.add(offset)
        state.next_offset = max(offset + 1, state.next_offset or 0)
        return Ticket(tp, offset, state.epoch)

    def is_current(self, ticket: Ticket) -> bool:
        state = self._partitions.get(ticket.partition)
        return state is not None and state.epoch == ticket.epoch and ticket.offset in state.in_flight

    def add_parts(self, ticket: Ticket, parts: int) -> None:
        """The input behind `ticket` became `parts` requests; it finishes when all of them have."""
        if parts > 1 and self.is_current(ticket):
            self._partitions[ticket.partition].extra_parts[ticket.offset] = parts - 1

    def finish(self, ticket: Ticket) -> bool:
        """Mark one part of an input acknowledged; False if its assignment is gone."""
        if not self.is_current(ticket):
            return False
        state = self._partitions[ticket.partition]
        extra = state.extra_parts.pop(ticket.offset, 0)
        if extra > 1:
            state.extra_parts[ticket.offset] = extra - 1
        elif extra == 0:
            state.in_flight.discard(ticket.offset)
        return True

    def committable(self) -> dict[TopicPartition, int]:
        """Per partition, the offset to commit (next to read), where it advanced."""
        positions = {tp: state.committable() for tp, state in self._partitions.items()}
        return {tp: pos for tp, pos in positions.items() if pos is not None}

    def committable_if_finished(self, tickets: list[Ticket]) -> dict[TopicPartition, int]:
        """What `committable` would return after finishing `tickets`, without changing state.

        Exactly-once needs the offsets before the transaction commits, and must
        leave the tickets unfinished if it aborts.
        """
        finishing: dict[TopicPartition, Counter[int]] = {}
        for ticket in tickets:
            if self.is_current(ticket):
                finishing.setdefault(ticket.partition, Counter())[ticket.offset] += 1
        result = {}
        for tp, state in self._partitions.items():
            counts = finishing.get(tp, Counter())
            done = {offset for offset, n in counts.items() if n > state.extra_parts.get(offset, 0)}
            remaining = state.in_flight - done
            position = min(remaining) if remaining else state.next_offset
            if position is not None and position != state.committed:
                result[tp] = position
        return result

    def in_flight_for(self, partitions: list[TopicPartition]) -> int:
        return sum(len(self._partitions[tp].in_flight) for tp in partitions if tp in self._partitions)

    def mark_committed(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, offset in offsets.items():
            if tp in self._partitions:
                self._partitions[tp].committed = offset

    def committed(self, tp: TopicPartition) -> int | None:
        """The offset this worker last committed for `tp` in its current assignment."""
        state = self._partitions.get(tp)
        return state.committed if state is not None else None

    def in_flight_count(self) -> int:
        """Inputs read whose outputs are not acknowledged yet."""
        return sum(len(s.in_flight) for s in self._partitions.values())

    def uncommitted_count(self) -> int:
        """Offsets read past the committed position, finished or not.

        This is what a crash makes the group read again, so the in-flight
        limit bounds it: with out-of-order completion, counting only
        unfinished inputs would let one stuck input hold back an unbounded
        run of finished, published, uncommitted ones.
        """
        return sum(s.uncommitted() for s in self._partitions.values())

    def position(self, tp: TopicPartition) -> int | None:
        """The next offset this worker will read from `tp`, as far as it knows."""
        state = self._partitions.get(tp)
        if state is None:
            return None
        return state.next_offset if state.next_offset is not None else state.committed

    def partitions(self) -> list[TopicPartition]:
        return list(self._partitions)
