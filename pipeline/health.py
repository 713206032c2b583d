"""What /healthz and /readyz report: kept up to date by the worker, read by the ops server.

Liveness asks "is this process still making progress?": the poll loop turns,
and no stage has been stuck on one piece of work past `stall_threshold_s`.
A failing liveness probe gets the pod restarted, so it must never fail merely
because the process is busy or idle.

Readiness asks "is this worker doing useful work right now?": the model is
loaded, the classifiers are built, the consumer holds partitions, inference
has not failed `max_inference_failures` times in a row, and it is not
shutting down. A model that throws on every batch therefore reads as
not-ready even though the process stays up (infinity's green-but-dead case).

All methods are thread-safe; every update is O(1) under one lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

from pipeline.config import HealthSettings

POLL_STAGE = "poll"


class Probe(NamedTuple):
    """A probe's answer; unpacks as `ok, details`."""

    ok: bool
    details: dict[str, Any]


class HealthState:
    def __init__(
        self,
        stall_threshold_s: float = 300.0,
        max_inference_failures: int = 3,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stall_threshold_s = stall_threshold_s
        self.max_inference_failures = max_inference_failures
        self._clock = clock
        self._lock = threading.Lock()
        # Loops expected to turn: stage -> last heartbeat.
        self._heartbeats: dict[str, float] = {}
        # Work in progress: (stage, thread id) -> busy since.
        self._busy: dict[tuple[str, int], float] = {}
        self._model_loaded = False
        self._classifiers_built = False
        self._partitions: set[str] = set()
        self._failures_in_a_row = 0
        self._last_inference_error: str | None = None
        self._stopping = False

    @classmethod
    def from_settings(cls, settings: HealthSettings) -> HealthState:
        return cls(settings.stall_threshold_s, settings.max_inference_failures)

    # -- liveness inputs ---------------------------------------------------------

    def poll_loop_tick(self) -> None:
        """Call once per turn of the poll loop (the drain loop included)."""
        self.stage_heartbeat(POLL_STAGE)

    def stage_heartbeat(self, stage: str) -> None:
        """`stage` is a loop that keeps turning: from now on it must beat within the threshold.

        Also counts as progress for this thread's busy entry in `stage`, if any.
        """
        now = self._clock()
        with self._lock:
            self._heartbeats[stage] = now
            key = (stage, threading.get_ident())
            if key in self._busy:
                self._busy[key] = now

    def stage_busy(self, stage: str, since: float | None = None) -> None:
        """This thread started one piece of work in `stage` at `since` (the state's clock; default now)."""
        started = self._clock() if since is None else since
        with self._lock:
            self._busy[(stage, threading.get_ident())] = started

    def stage_idle(self, stage: str) -> None:
        """This thread finished its work in `stage`; an idle stage never counts as stalled."""
        with self._lock:
            self._busy.pop((stage, threading.get_ident()), None)

    @contextmanager
    def working(self, stage: str) -> Iterator[None]:
        """`with health.working("infer"): ...` marks this thread busy in `stage` for the block."""
        self.stage_busy(stage)
        try:
            yield
        finally:
            self.stage_idle(stage)

    def stage_stopped(self, stage: str) -> None:
        """`stage`'s loop ended on purpose: stop expecting heartbeats or progress from it."""
        with self._lock:
            self._heartbeats.pop(stage, None)
            self._busy = {key: since for key, since in self._busy.items() if key[0] != stage}

    # -- readiness inputs --------------------------------------------------------

    def model_loaded(self) -> None:
        with self._lock:
            self._model_loaded = True

    def classifiers_built(self) -> None:
        with self._lock:
            self._classifiers_built = True

    def assignment_changed(self, partitions: Iterable[tuple[str, int]]) -> None:
        """The consumer's complete current assignment (TopicPartitions are (topic, partition) tuples)."""
        names = {_partition_name(tp) for tp in partitions}
        with self._lock:
            self._partitions = names

    def partitions_added(self, partitions: Iterable[tuple[str, int]]) -> None:
        """Incremental form for cooperative rebalances, whose callbacks name only what changed."""
        names = {_partition_name(tp) for tp in partitions}
        with self._lock:
            self._partitions |= names

    def partitions_removed(self, partitions: Iterable[tuple[str, int]]) -> None:
        names = {_partition_name(tp) for tp in partitions}
        with self._lock:
            self._partitions -= names

    def inference_succeeded(self) -> None:
        with self._lock:
            self._failures_in_a_row = 0
            self._last_inference_error = None

    def inference_failed(self, error: str | None = None) -> None:
        with self._lock:
            self._failures_in_a_row += 1
            self._last_inference_error = error

    def stopping(self) -> None:
        """Shutdown began: stop advertising readiness while the drain runs."""
        with self._lock:
            self._stopping = True

    # -- the probes --------------------------------------------------------------

    def liveness(self) -> Probe:
        with self._lock:
            return self._liveness_locked(self._clock())

    def readiness(self) -> Probe:
        with self._lock:
            live = self._liveness_locked(self._clock())
            checks = self._readiness_checks_locked()
        reasons = _readiness_reasons(checks) + ([] if live.ok else ["not live: " + "; ".join(live.details["reasons"])])
        ok = not reasons
        details = {"status": "ok" if ok else "failing", "checks": checks, "live": live.ok, "reasons": reasons}
        return Probe(ok, details)

    def _liveness_locked(self, now: float) -> Probe:
        stale = {stage: round(now - beat, 3) for stage, beat in self._heartbeats.items()
                 if now - beat > self.stall_threshold_s}
        stalled = self._stalled_work_locked(now)
        reasons = [f"{stage} loop has not turned for {age:.0f}s" for stage, age in sorted(stale.items())]
        reasons += [f"{stage} busy on one item for {age:.0f}s" for stage, age in sorted(stalled.items())]
        details = {
            "status": "ok" if not reasons else "failing",
            "poll_loop_started": POLL_STAGE in self._heartbeats,
            "seconds_since_heartbeat": {stage: round(now - beat, 3) for stage, beat in self._heartbeats.items()},
            "stalled_stages": {**stale, **stalled},
            "stall_threshold_s": self.stall_threshold_s,
            "reasons": reasons,
        }
        return Probe(not reasons, details)

    def _stalled_work_locked(self, now: float) -> dict[str, float]:
        """The oldest piece of work per stage that has been busy past the threshold."""
        stalled: dict[str, float] = {}
        for (stage, _thread), since in self._busy.items():
            age = now - since
            if age > self.stall_threshold_s:
                stalled[stage] = round(max(age, stalled.get(stage, 0.0)), 3)
        return stalled

    def _readiness_checks_locked(self) -> dict[str, Any]:
        return {
            "model_loaded": self._model_loaded,
            "classifiers_built": self._classifiers_built,
            "assigned_partitions": sorted(self._partitions),
            "inference_failures_in_a_row": self._failures_in_a_row,
            "max_inference_failures": self.max_inference_failures,
            "last_inference_error": self._last_inference_error,
            "stopping": self._stopping,
        }


def _readiness_reasons(checks: dict[str, Any]) -> list[str]:
    reasons = []
    if not checks["model_loaded"]:
        reasons.append("model not loaded")
    if not checks["classifiers_built"]:
        reasons.append("classifiers not built")
    if not checks["assigned_partitions"]:
        reasons.append("no partitions assigned")
    if checks["inference_failures_in_a_row"] >= checks["max_inference_failures"]:
        reasons.append(f"inference failed {checks['inference_failures_in_a_row']} times in a row")
    if checks["stopping"]:
        reasons.append("shutting down")
    return reasons


def _partition_name(partition: tuple[str, int]) -> str:
    topic, number = partition[0], partition[1]
    return f"{topic}:{number}"
