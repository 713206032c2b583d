"""The ops HTTP server: /metrics, /healthz and /readyz on one port (`metrics.port`).

/metrics is prometheus_client's own WSGI exposition (text or OpenMetrics, gzip,
`name[]` filters). The probes answer 200 with their JSON details when they
pass and 503 with the same details when they fail, so both a kubelet and a
human with curl learn why. Knows nothing of Kafka: it reads a HealthState.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, CollectorRegistry, make_wsgi_app

# Imported for its side effect: every labelstream metric is registered before the first scrape.
import pipeline.metrics  # noqa: F401
from pipeline.config import MetricsSettings
from pipeline.errors import ConfigError
from pipeline.health import HealthState, Probe

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

_STATUS_LINES = {200: "200 OK", 404: "404 Not Found", 503: "503 Service Unavailable"}


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    # A slow scraper must not hold up a probe.
    daemon_threads = True


class _IPv6ThreadingWSGIServer(_ThreadingWSGIServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        # Probes hit every few seconds; access lines would drown the structured logs.
        return


def ops_app(health: HealthState, registry: CollectorRegistry = REGISTRY) -> WsgiApp:
    """The WSGI app behind the server, usable on its own (e.g. mounted elsewhere)."""
    metrics_app = make_wsgi_app(registry)
    probes: dict[str, Callable[[], Probe]] = {"/healthz": health.liveness, "/readyz": health.readiness}

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path == "/metrics":
            return metrics_app(environ, start_response)
        if path in probes:
            ok, details = probes[path]()
            return _json_response(start_response, 200 if ok else 503, details)
        return _json_response(start_response, 404, {"error": f"no such path {path}",
                                                   "paths": ["/metrics", "/healthz", "/readyz"]})

    return app


def _json_response(start_response: Callable[..., Any], status: int, body: dict[str, Any]) -> list[bytes]:
    payload = json.dumps(body, sort_keys=True).encode("utf-8")
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(payload))),
               ("Cache-Control", "no-store")]
    start_response(_STATUS_LINES[status], headers)
    return [payload]


class OpsServer:
    """Serves `ops_app` from a daemon thread. Port 0 here means "any free port" (tests);
    use `start_ops_server` for the settings' meaning of 0 (disabled)."""

    def __init__(self, health: HealthState, host: str = "0.0.0.0", port: int = 9400,
                 registry: CollectorRegistry = REGISTRY) -> None:
        self._app = ops_app(health, registry)
        self._host = host
        self._requested_port = port
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> OpsServer:
        """Bind and serve; raises ConfigError when the address cannot be bound."""
        server_class = _IPv6ThreadingWSGIServer if ":" in self._host else _ThreadingWSGIServer
        try:
            self._server = make_server(self._host, self._requested_port, self._app, server_class, _QuietHandler)
        except OSError as exc:
            raise ConfigError(f"metrics server cannot listen on {self._host}:{self._requested_port}: {exc}",
                              code="config.metrics_port") from exc
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="ops-server", daemon=True)
        self._thread.start()
        return self

    @property
    def port(self) -> int:
        """The bound port (the real one when started with port 0)."""
        if self._server is None:
            raise RuntimeError("ops server not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        # A wildcard address is not something a client can connect to.
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self._host, self._host)
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop serving and release the port; safe to call twice."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def __enter__(self) -> OpsServer:
        return self.start() if self._server is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_ops_server(settings: MetricsSettings, health: HealthState,
                     registry: CollectorRegistry = REGISTRY) -> OpsServer | None:
    """The worker's entry point: None when `metrics.port` is 0 (server off)."""
    if settings.port == 0:
        return None
    return OpsServer(health, settings.host, settings.port, registry).start()
