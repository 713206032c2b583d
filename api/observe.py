"""Request counts and latency per path and status (labelstream_http_requests_total, _request_seconds)."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline import metrics

# Paths are a metric label: anything else is counted as "other", so scanners cannot grow the series.
KNOWN_PATHS = frozenset({"/v1/embeddings", "/v1/classify", "/v1/models", "/healthz", "/readyz", "/metrics",
                         "/openapi.json", "/docs"})


class RequestMetrics:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        path = path if path in KNOWN_PATHS else "other"
        status = 500
        started = time.perf_counter()

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            metrics.HTTP_REQUESTS.labels(path=path, status=str(status)).inc()
            metrics.HTTP_SECONDS.labels(path=path).observe(time.perf_counter() - started)
