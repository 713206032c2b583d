"""Stopping the worker when dead letters say something is wrong with the deploy.

A wrong bucket name or a broken model would otherwise dead-letter the whole
stream. Like arroyo's `DlqLimit`, the breaker trips on N dead letters in a
row, or on more than a share of the recent window. To be able to stop
without committing past the last good message, a current run of dead letters
is held back from the commit until a good outcome ends it (or it has been
held for `hold_timeout_s`, so a quiet stream still commits).
"""

from __future__ import annotations

import time
from collections import deque

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

    def admit(self, outcomes: list[Outcome]) -> list[Outcome]:
        """Outcomes that may be published and committed now; raises CircuitOpenError on a trip."""
        released: list[Outcome] = []
        for outcome in outcomes:
            released.extend(self._record(outcome))
        self._check_trip()
        if self._held and self._held_for() >= self._settings.hold_timeout_s:
            released.extend(self._release())
        return released

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

    def _release(self) -> list[Outcome]:
        held, self._held, self._held_since = self._held, [], None
        return held

    def _held_for(self) -> float:
        return 0.0 if self._held_since is None else time.monotonic() - self._held_since

    def _check_trip(self) -> None:
        s = self._settings
        if self._consecutive >= s.max_consecutive:
            raise CircuitOpenError(f"{self._consecutive} dead letters in a row (limit {s.max_consecutive})")
        failures = sum(self._recent)
        if len(self._recent) >= s.min_messages and failures / len(self._recent) > s.max_ratio:
            raise CircuitOpenError(
                f"{failures} of the last {len(self._recent)} inputs were dead-lettered (limit {s.max_ratio:.0%})"
            )

    def release_all(self) -> list[Outcome]:
        """On a graceful stop, dead letters are terminal outcomes like any other."""
        return self._release()

    def held_count(self) -> int:
        return len(self._held)
