"""From parsed inputs to model results: prepare on a thread pool, queue on the shared engine, await.

Every input is fetched and decoded before the first is queued, so a bad
input fails its request without costing the model anything. While the jobs
wait, the client's connection is watched: when it goes away the jobs are
cancelled, and the engine drops them instead of running them.
"""

from __future__ import annotations

import asyncio
import queue
from concurrent.futures import Future, ThreadPoolExecutor

from starlette.requests import Request

from api.errors import ApiError, from_pipeline
from api.images import ImageInput
from api.rate_limit import retry_after_header
from pipeline.errors import LabelstreamError
from pipeline.fetch import ImageFetcher
from pipeline.inference import InferenceEngine, JobFactory, JobResult
from pipeline.labeler import Labeler, PreparedImage

# A full queue drains in about a batch time; a second is a fair first guess for a client's back-off.
QUEUE_FULL_RETRY_AFTER_S = 1.0


class ClientGone(Exception):
    """The client disconnected while its jobs waited; there is nobody to answer."""


class JobRunner:
    def __init__(self, engine: InferenceEngine, labeler: Labeler, fetcher: ImageFetcher, threads: int,
                 timeout_s: float) -> None:
        self.engine, self.labeler, self.fetcher = engine, labeler, fetcher
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="http-prepare")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def prepare_images(self, inputs: list[ImageInput]) -> list[PreparedImage]:
        """Fetch and decode every input in parallel; the first failure (in input order) fails the request."""
        loop = asyncio.get_running_loop()
        with self.engine.preparing():
            results = await asyncio.gather(
                *(loop.run_in_executor(self._pool, self.labeler.prepare, item.source, self.fetcher) for item in inputs),
                return_exceptions=True,
            )
        for item, result in zip(inputs, results, strict=True):
            if isinstance(result, LabelstreamError):
                raise from_pipeline(result, item.param)
            if isinstance(result, BaseException):
                raise result
        return list(results)  # type: ignore[arg-type]

    async def run(self, request: Request, factories: list[JobFactory]) -> list[JobResult]:
        """Queue one job per factory and wait for all of them (or the client leaving, or the timeout)."""
        futures = self._submit_all(factories)
        waiting = asyncio.ensure_future(asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({waiting, gone}, timeout=self.timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if waiting not in done:
            _cancel(futures)
            waiting.cancel()
            if gone in done:
                raise ClientGone()
            raise ApiError(504, f"no result within {self.timeout_s:.0f}s (http.request_timeout_s)", code="timeout")
        results: list[JobResult] = waiting.result()
        for index, result in enumerate(results):
            if result.error is not None:
                raise from_pipeline(result.error, f"input.{index}")
        return results

    def _submit_all(self, factories: list[JobFactory]) -> list[Future[JobResult]]:
        try:
            return self.engine.submit_for_futures(factories)
        except queue.Full:
            raise ApiError(503, "the server is at capacity (http.max_queue items waiting); retry shortly",
                           code="queue_full", headers=retry_after_header(QUEUE_FULL_RETRY_AFTER_S)) from None


def _cancel(futures: list[Future[JobResult]]) -> None:
    for future in futures:
        future.cancel()


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone; the body was already read, so only a disconnect can arrive."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
