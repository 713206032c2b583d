"""OffsetTracker: what may be committed when items finish out of order and partitions move."""

from __future__ import annotations

from kafka import TopicPartition

from consumers.offsets import OffsetTracker

TP0 = TopicPartition("requests", 0)
TP1 = TopicPartition("requests", 1)


def _tracker_with(tp: TopicPartition, offsets: range) -> tuple[OffsetTracker, dict[int, object]]:
    tracker = OffsetTracker()
    tracker.assign([tp])
    return tracker, {offset: tracker.start(tp, offset) for offset in offsets}


def test_out_of_order_finish_never_commits_past_an_unfinished_offset() -> None:
    tracker, tickets = _tracker_with(TP0, range(5))
    # Offsets 2 and 3 (small images) finish before 0 and 1 (big ones).
    assert tracker.finish(tickets[3]) and tracker.finish(tickets[2])
    assert tracker.committable().get(TP0, 0) == 0

    assert tracker.finish(tickets[0])
    assert tracker.committable() == {TP0: 1}
    assert tracker.finish(tickets[1])
    assert tracker.committable() == {TP0: 4}
    assert tracker.finish(tickets[4])
    assert tracker.committable() == {TP0: 5}


def test_committable_offset_is_the_next_to_read() -> None:
    tracker, tickets = _tracker_with(TP0, range(10, 13))
    for ticket in tickets.values():
        tracker.finish(ticket)
    assert tracker.committable() == {TP0: 13}


def test_committable_only_when_advanced() -> None:
    tracker, tickets = _tracker_with(TP0, range(3))
    for ticket in tickets.values():
        tracker.finish(ticket)
    tracker.mark_committed(tracker.committable())
    assert tracker.committable() == {}

    ticket = tracker.start(TP0, 3)
    assert tracker.committable() == {}, "an unfinished offset must not advance the position"
    tracker.finish(ticket)
    assert tracker.committable() == {TP0: 4}
    tracker.mark_committed({TP0: 4})
    assert tracker.committable() == {}


def test_partitions_are_tracked_independently() -> None:
    tracker = OffsetTracker()
    tracker.assign([TP0, TP1])
    slow = tracker.start(TP0, 0)
    fast = tracker.start(TP1, 0)
    tracker.finish(fast)
    committable = tracker.committable()
    assert committable[TP1] == 1
    assert committable.get(TP0, 0) == 0
    tracker.finish(slow)
    assert tracker.committable() == {TP0: 1, TP1: 1}


def test_revoke_makes_tickets_stale() -> None:
    tracker, tickets = _tracker_with(TP0, range(3))
    tracker.revoke([TP0])

    assert not tracker.is_current(tickets[0])
    assert tracker.finish(tickets[0]) is False
    assert tracker.committable() == {}
    assert tracker.in_flight_count() == 0
    assert TP0 not in tracker.partitions()


def test_reassign_after_revoke_gives_a_new_epoch() -> None:
    tracker, tickets = _tracker_with(TP0, range(2))
    old = tickets[0]
    tracker.revoke([TP0])
    tracker.assign([TP0])
    new = tracker.start(TP0, 0)

    assert new.epoch != old.epoch
    assert new.offset == old.offset
    # The old owner's late finish must not complete the new owner's work.
    assert tracker.finish(old) is False
    assert tracker.is_current(new)
    assert tracker.committable().get(TP0, 0) == 0
    assert tracker.finish(new) is True
    assert tracker.committable() == {TP0: 1}


def test_assign_of_a_held_partition_keeps_its_state() -> None:
    tracker, tickets = _tracker_with(TP0, range(2))
    tracker.assign([TP0, TP1])
    assert tracker.is_current(tickets[0])
    assert tracker.in_flight_count() == 2


def test_finish_twice_is_rejected() -> None:
    tracker, tickets = _tracker_with(TP0, range(1))
    assert tracker.finish(tickets[0]) is True
    assert tracker.finish(tickets[0]) is False


def test_start_on_an_unassigned_partition_assigns_it() -> None:
    tracker = OffsetTracker()
    ticket = tracker.start(TP1, 7)
    assert tracker.is_current(ticket)
    assert TP1 in tracker.partitions()
    tracker.finish(ticket)
    assert tracker.committable() == {TP1: 8}


def test_mark_committed_for_a_revoked_partition_is_ignored() -> None:
    tracker, tickets = _tracker_with(TP0, range(1))
    tracker.finish(tickets[0])
    tracker.revoke([TP0])
    tracker.mark_committed({TP0: 1})
    assert TP0 not in tracker.partitions()


def test_in_flight_count() -> None:
    tracker, tickets = _tracker_with(TP0, range(4))
    tracker.start(TP1, 0)
    assert tracker.in_flight_count() == 5
    tracker.finish(tickets[1])
    assert tracker.in_flight_count() == 4
