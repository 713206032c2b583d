"""structlog set-up: JSON lines in production, a readable format on a terminal."""

from __future__ import annotations

import logging
import sys

import structlog

from pipeline.config import LogSettings


def configure_logging(settings: LogSettings) -> None:
    level = logging.getLevelName(settings.level)
    use_console = settings.format == "console" or (settings.format == "auto" and sys.stderr.isatty())
    renderer = structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Library chatter (kafka-python, open_clip) only when it matters.
    logging.basicConfig(level=max(level, logging.WARNING), stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
