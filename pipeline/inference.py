"""The inference engine: one thread per process owns every model call.

Kafka items (the worker) and HTTP items (the API) reach it through the two
lanes of a LaneBatcher, so they share micro-batches and one model instance.
A job carries its input (preprocessed pixels, with an optional classifier, or
a text), where it came from, a `claim` that says whether its caller still
wants it, and a `done` callback that receives exactly one JobResult.

What the worker's inference thread did lives here now: adaptive batching,
splitting a failing batch so one bad item fails alone, health and metrics
updates, and storing fresh labels in the dedupe cache. Image and text jobs of
one batch are encoded by their own tower, one after the other.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, Union

import numpy as np
import structlog
import torch

from pipeline import metrics
from pipeline.batcher import Lane, LaneBatcher
from pipeline.classifier import ZeroShotClassifier, as_numpy
from pipeline.config import Settings
from pipeline.errors import InferenceError, LabelstreamError
from pipeline.health import HealthState
from pipeline.labeler import ImageLabels, Labeler

log = structlog.get_logger("labelstream.inference")

Source = Literal["http", "kafka"]
_LANES: dict[Source, Lane] = {"http": "interactive", "kafka": "stream"}


@dataclass(frozen=True)
class JobResult:
    """Exactly one per job that reached the model: an embedding (and labels), or the error."""

    embedding: np.ndarray | None = None
    labels: ImageLabels | None = None
    error: LabelstreamError | None = None
    infer_ms: float = 0.0


def _always_wanted() -> bool:
    return True


@dataclass
class ImageJob:
    pixels: torch.Tensor
    # None: the embedding only (no labels).
    classifier: ZeroShotClassifier | None
    source: Source
    done: Callable[[JobResult], None]
    # Called once, when the job leaves its lane; False drops it unprocessed.
    claim: Callable[[], bool] = _always_wanted
    # SHA-256 of the image bytes: fresh labels are stored in the dedupe cache under it.
    content_key: str | None = None
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass
class TextJob:
    text: str
    source: Source
    done: Callable[[JobResult], None]
    claim: Callable[[], bool] = _always_wanted
    queued_at: float = field(default_factory=time.perf_counter)


Job = Union[ImageJob, TextJob]
# Builds a job from its completion callback and its claim; see InferenceEngine.submit_for_futures.
JobFactory = Callable[[Callable[[JobResult], None], Callable[[], bool]], Job]


@dataclass
class _Watchers:
    """Who else may be about to submit: the batcher waits for them only while one says so."""

    more_coming: list[Callable[[], bool]] = field(default_factory=list)
    on_wait: list[Callable[[float], None]] = field(default_factory=list)


class InferenceEngine:
    def __init__(self, labeler: Labeler, settings: Settings, health: HealthState) -> None:
        self.labeler = labeler
        self.health = health
        self._watchers = _Watchers()
        self._preparing = 0
        self._preparing_lock = threading.Lock()
        self._batcher: LaneBatcher[Job] = LaneBatcher(
            settings.batch.max_size,
            settings.batch.max_wait_ms,
            interactive_share=settings.http.batch_share,
            capacity={"interactive": settings.http.max_queue, "stream": settings.worker.max_in_flight},
            more_coming=self._more_coming,
            discard=self._discard,
            interactive_max_size=settings.http.interactive_batch_size,
        )
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> InferenceEngine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def watch(self, more_coming: Callable[[], bool], on_wait: Callable[[float], None] | None = None) -> None:
        """A submitter's "more is on its way" test, and where to report the engine's idle waits."""
        self._watchers.more_coming.append(more_coming)
        if on_wait is not None:
            self._watchers.on_wait.append(on_wait)

    # -- submitting --------------------------------------------------------------

    def submit(self, job: Job, stop: threading.Event | None = None) -> None:
        """Queue a job. HTTP jobs raise queue.Full when their lane is full; Kafka jobs wait for room."""
        self._batcher.put(_LANES[job.source], job, stop)
        metrics.HTTP_QUEUE_DEPTH.set(self._batcher.depth("interactive"))

    def submit_for_futures(self, factories: list[JobFactory]) -> list[Future[JobResult]]:
        """Queue the jobs the factories build (`make_job(done, claim)`), all or none; results arrive in Futures.

        Raises queue.Full, queueing nothing, when the HTTP lane has no room for
        all of them. Cancelling a Future before its job is batched drops the job.
        """
        futures: list[Future[JobResult]] = [Future() for _ in factories]
        pairs = zip(factories, futures, strict=True)
        jobs = [make_job(f.set_result, f.set_running_or_notify_cancel) for make_job, f in pairs]
        sources = {job.source for job in jobs}
        if len(sources) != 1:
            raise ValueError(f"jobs queued together must share one source, not {sorted(sources)}")
        self._batcher.put_all(_LANES[jobs[0].source], list(jobs))
        metrics.HTTP_QUEUE_DEPTH.set(self._batcher.depth("interactive"))
        return futures

    @contextmanager
    def preparing(self) -> Iterator[None]:
        """Marks HTTP work being fetched and decoded, so a forming batch may wait for it."""
        with self._preparing_lock:
            self._preparing += 1
        try:
            yield
        finally:
            with self._preparing_lock:
                self._preparing -= 1
            self._batcher.nudge()

    def depth(self, source: Source) -> int:
        return self._batcher.depth(_LANES[source])

    def _more_coming(self) -> bool:
        return self._preparing > 0 or any(check() for check in self._watchers.more_coming)

    @staticmethod
    def _discard(job: Job) -> bool:
        if job.claim():
            return False
        metrics.DROPPED_JOBS.labels(source=job.source).inc()
        return True

    # -- the inference thread ----------------------------------------------------

    def _run(self) -> None:
        while not self._halt.is_set():
            started = time.perf_counter()
            batch = self._batcher.next_batch(self._halt)
            waited = time.perf_counter() - started
            for report in self._watchers.on_wait:
                report(waited)
            metrics.HTTP_QUEUE_DEPTH.set(self._batcher.depth("interactive"))
            if batch:
                self.run_batch(batch)

    def run_batch(self, batch: list[Job]) -> None:
        """Run one batch and hand every job its result; never raises."""
        _count_sources(batch)
        images = [job for job in batch if isinstance(job, ImageJob)]
        texts = [job for job in batch if isinstance(job, TextJob)]
        if images:
            metrics.BATCH_SIZE.observe(len(images))
            _deliver(images, self._label_images(images))
        if texts:
            _deliver(texts, self._embed_texts(texts))

    def _label_images(self, jobs: list[ImageJob]) -> list[JobResult]:
        """Encode and score a batch; on a model failure split it so one bad item fails alone."""
        try:
            with self.health.working("infer"):
                results = self._encode_and_score(jobs)
        except InferenceError as exc:
            return self._split(jobs, exc, self._label_images)
        except Exception as exc:  # noqa: BLE001 - nothing may vanish silently
            self.health.inference_failed(str(exc))
            return [JobResult(error=unexpected(exc, "infer")) for _ in jobs]
        self.health.inference_succeeded()
        for job, result in zip(jobs, results, strict=True):
            metrics.observe_stage("infer", result.infer_ms / 1000.0)
            if result.labels is not None:
                self.labeler.remember(job.content_key, result.labels)
        return results

    def _encode_and_score(self, jobs: list[ImageJob]) -> list[JobResult]:
        started = time.perf_counter()
        features = self.labeler.encode([job.pixels for job in jobs])
        labels = [None if job.classifier is None else self.labeler.score(f, job.classifier)
                  for f, job in zip(features, jobs, strict=True)]
        infer_ms = _ms_since(started)
        return [JobResult(embedding=as_numpy(f),
                          labels=None if l is None else dataclasses.replace(l, infer_ms=infer_ms),
                          infer_ms=infer_ms)
                for f, l in zip(features, labels, strict=True)]  # fmt: skip

    def _embed_texts(self, jobs: list[TextJob]) -> list[JobResult]:
        try:
            with self.health.working("infer"):
                started = time.perf_counter()
                features = self._encode_texts([job.text for job in jobs])
        except InferenceError as exc:
            return self._split(jobs, exc, self._embed_texts)
        except Exception as exc:  # noqa: BLE001
            return [JobResult(error=unexpected(exc, "infer")) for _ in jobs]
        infer_ms = _ms_since(started)
        return [JobResult(embedding=as_numpy(f), infer_ms=infer_ms) for f in features]

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        try:
            return self.labeler.model.encode_texts(texts)
        except (RuntimeError, ValueError) as exc:
            raise InferenceError(f"text encoder failed on a batch of {len(texts)}: {exc}") from exc

    def _split(self, jobs: list, exc: InferenceError, again: Callable[[list], list[JobResult]]) -> list[JobResult]:
        if len(jobs) == 1:
            # Only a single input's failure counts against readiness: the split
            # attempts of one poison batch would otherwise flip it at once.
            self.health.inference_failed(exc.message)
            return [JobResult(error=exc)]
        half = len(jobs) // 2
        return again(jobs[:half]) + again(jobs[half:])


def _count_sources(batch: list[Job]) -> None:
    now = time.perf_counter()
    for job in batch:
        metrics.QUEUE_SECONDS.labels(source=job.source).observe(max(now - job.queued_at, 0.0))
    sources = {job.source for job in batch}
    for source in sources:
        metrics.BATCH_ITEMS.labels(source=source).inc(sum(1 for job in batch if job.source == source))
    if len(sources) > 1:
        metrics.MIXED_BATCHES.inc()


def _deliver(jobs: list, results: list[JobResult]) -> None:
    for job, result in zip(jobs, results, strict=True):
        try:
            job.done(result)
        except Exception:  # noqa: BLE001 - one caller's broken callback must not stop the model thread
            log.exception("job_callback_failed", source=job.source)


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0


def unexpected(exc: Exception, stage: str) -> LabelstreamError:
    return LabelstreamError(f"unexpected {type(exc).__name__}: {exc}", code="internal.unexpected", stage=stage)  # type: ignore[arg-type]
