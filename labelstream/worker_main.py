"""`labelstream run`: assemble the worker from settings and run it until told to stop."""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path
from types import FrameType

import structlog

from consumers.circuit_breaker import CircuitOpenError
from consumers.kafka_clients import build_consumer, build_producer, build_transactional_producer
from consumers.publisher import OutputPublisher
from consumers.worker import Worker
from labelstream.logs import configure_logging
from pipeline.config import Settings, load_settings
from pipeline.fetch import ImageFetcher
from pipeline.labeler import build_labeler

log = structlog.get_logger("labelstream.run")


def run_worker(config_file: Path | None) -> int:
    settings = load_settings(config_file)
    configure_logging(settings.log)
    log.info("starting", settings=settings.model_dump(mode="json"))
    labeler = build_labeler(settings)
    log.info("model_ready", model=labeler.model.ref.model_dump(), device=str(labeler.model.device),
             load_seconds=round(labeler.model.load_seconds, 2), taxonomies=labeler.registry.names())
    producer = build_producer(settings.kafka)
    publisher = OutputPublisher(producer, settings.topics, labeler.model.ref, settings.kafka.produce_timeout_s)
    consumer = build_consumer(settings.kafka)
    worker = Worker(settings, labeler, ImageFetcher(settings.s3, settings.fetch), consumer, publisher)
    _install_signal_handlers(worker)
    # Taxonomy hot reload (files and the taxonomies topic) runs beside the worker.
    from consumers.taxonomy_feed import start_taxonomy_updates

    taxonomy_updates = start_taxonomy_updates(settings, labeler)
    try:
        worker.run()
    finally:
        taxonomy_updates.stop()
        consumer.close(autocommit=False)
        producer.close(timeout=settings.kafka.produce_timeout_s)
    log.info("stopped")
    return 0


def _install_signal_handlers(worker: Worker) -> None:
    received: list[int] = []

    def handle(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        if len(received) == 1:
            log.info("stop_requested", signal=signal.Signals(signum).name)
            worker.request_stop()
            return
        # A second signal means "now": leave without committing unfinished work.
        log.warning("forced_exit", signal=signal.Signals(signum).name)
        sys.stderr.flush()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
