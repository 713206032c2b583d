"""Stopping the worker when dead letters say something is wrong with the deploy.

A wrong bucket name or a broken model would otherwise dead-letter the whole
stream. Like arroyo's `DlqLimit`, the breaker trips on N dead letters in a
row, or on more than a share of the recent window. To be able to stop
without committing past the last good message, a current run of dead letters
is held back from the commit until a good outcome ends it (or it has been
held for `hold_timeout_s`, so a quiet stream still commits).

Once tripped, the gate releases nothing that comes after the held run:
dead letters stay held, and a good outcome passes only if it comes before
the first held dead letter of its partition (work that was already under way
when the poison arrived). What stays held is never committed, so a restart
after the fix reads it again.
"""

from __future__ import annotations

import time
from collections import deque

from kafka import TopicPartition

from consumers.records import Outcome
from pipeline.config import DeadLetterSettings
from pipeline.errors import LabelstreamError


class CircuitOpenError(LabelstreamError):
    code = "worker.circuit_open"
    stage = "publish"


class DeadLetterGate:
    def __init__(self, settings: DeadLetterSettings) -> None:
        self._settings = settings
        self._recent: deque[bool] = deque(maxlen=settings.window)
        self._consecutive = 0
        self._held: list[Outcome] = []
        self._held_since: float | None = None
        self.trip_reason: str | None = None

    @property
    def tripped(self) -> bool:
        return self.trip_reason is not None

    def admit(self, outcomes: list[Outcome]) -> list[Outcome]:
        """Outcomes that may be published and committed now, in the order they may go."""
        released: list[Outcome] = []
        for outcome in outcomes:
            if self.tripped:
                released.extend(self._after_trip(outcome))
                continue
            released.extend(self._record(outcome))
            self.trip_reason = self._trip_reason()
        if not self.tripped and self._held and self._held_for() >= self._settings.hold_timeout_s:
            released.extend(self._release())
        return released

    def release_all(self) -> list[Outcome]:
        """On a graceful stop, dead letters are terminal outcomes like any other; not once tripped."""
        return [] if self.tripped else self._release()

    def held_count(self) -> int:
        return len(self._held)

    def _record(self, outcome: Outcome) -> list[Outcome]:
        failed = outcome.error is not None
        self._recent.append(failed)
        if not failed:
            self._consecutive = 0
            return [*self._release(), outcome]
        self._consecutive += 1
        if not self._held:
            self._held_since = time.monotonic()
        self._held.append(outcome)
        return []

    def _after_trip(self, outcome: Outcome) -> list[Outcome]:
        if outcome.error is not None:
            self._held.append(outcome)
            return []
        barrier = self._first_held_offset(outcome.item.ticket.partition)
        return [outcome] if barrier is None or outcome.item.offset < barrier else []

    def _first_held_offset(self, partition: TopicPartition) -> int | None:
        offsets = [o.item.offset for o in self._held if o.item.ticket.partition == partition]
        return min(offsets, default=None)

    def _release(self) -> list[Outcome]:
        held, self._held, self._held_since = self._held, [], None
        return held

    def _held_for(self) -> float:
        return 0.0 if self._held_since is None else time.monotonic() - self._held_since

    def _trip_reason(self) -> str | None:
        s = self._settings
        if self._consecutive >= s.max_consecutive:
            return f"{self._consecutive} dead letters in a row (limit {s.max_consecutive})"
        failures = sum(self._recent)
        if len(self._recent) >= s.min_messages and failures / len(self._recent) > s.max_ratio:
            return f"{failures} of the last {len(self._recent)} inputs were dead-lettered (limit {s.max_ratio:.0%})"
        return None
