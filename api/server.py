"""Serving the app with uvicorn on a background thread (`serve`, `run --http`, tests)."""

from __future__ import annotations

import threading
import time

import structlog
import uvicorn
from fastapi import FastAPI

from pipeline.config import HttpSettings
from pipeline.errors import ConfigError

log = structlog.get_logger("labelstream.api")


class ApiServer:
    """One uvicorn server. Port 0 means any free port; `port` then says which."""

    def __init__(self, app: FastAPI, settings: HttpSettings) -> None:
        # log_config=None: uvicorn must not replace the process's logging set-up; its
        # access log is off because the request metrics cover it and lines could carry URLs.
        config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                                lifespan="off", timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._host = settings.host
        self._thread: threading.Thread | None = None

    def start(self, timeout_s: float = 30.0) -> ApiServer:
        """Serve from a daemon thread; returns once listening, raises ConfigError if it cannot bind."""
        self._thread = threading.Thread(target=self._server.run, name="http-api", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"the HTTP API cannot listen on {self._host}:{self._server.config.port}",
                                  code="config.http_port")
            time.sleep(0.02)
        log.info("http_listening", host=self._host, port=self.port)
        return self

    @property
    def port(self) -> int:
        sockets = [s for server in self._server.servers for s in server.sockets]
        return int(sockets[0].getsockname()[1]) if sockets else self._server.config.port

    def stop(self, timeout_s: float = 10.0) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
