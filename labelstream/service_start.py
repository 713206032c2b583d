"""What every long-running labelstream process does first (`run`, `run --http`, `serve`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import structlog

from labelstream.logs import configure_logging
from pipeline.config import Settings, load_settings
from pipeline.health import HealthState
from pipeline.metrics_server import start_ops_server


@contextmanager
def started_service(config_file: Path | None, logger: str) -> Iterator[tuple[Settings, HealthState]]:
    """Settings, JSON logs and the ops server, which is stopped on the way out.

    The ops server comes first, so /healthz answers and /readyz says "not
    ready" while the model loads.
    """
    settings = load_settings(config_file)
    configure_logging(settings.log)
    structlog.get_logger(logger).info("starting", settings=settings.model_dump(mode="json"))
    health = HealthState.from_settings(settings.health)
    ops = start_ops_server(settings.metrics, health)
    try:
        yield settings, health
    finally:
        if ops is not None:
            ops.stop()
