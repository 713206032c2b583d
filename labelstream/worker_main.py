"""`labelstream run`: assemble the worker from settings and run it until told to stop.

Exit codes: 0 stopped with everything in flight committed; 1 the drain timeout
abandoned work (it is read again after a restart); 3 the dead-letter circuit
breaker opened; 4 outputs could not be published within the publish budget,
or the transactional producer was fenced; 143 (128 + SIGTERM) a second
signal forced an immediate exit.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path
from types import FrameType

import structlog
from kafka import KafkaConsumer, KafkaProducer

from consumers.circuit_breaker import CircuitOpenError
from consumers.kafka_clients import build_consumer, build_producer, build_transactional_producer
from consumers.publisher import OutputPublisher, require_route_topics
from consumers.sinks import build_sinks
from consumers.worker import Worker
from labelstream.service_start import started_service
from labelstream.serve import api_server
from pipeline.config import Settings
from pipeline.errors import PublishError
from pipeline.fetch import ImageFetcher
from pipeline.health import HealthState
from pipeline.inference import InferenceEngine
from pipeline.labeler import Labeler, build_labeler

log = structlog.get_logger("labelstream.run")

EXIT_DRAINED = 0
EXIT_ABANDONED = 1
EXIT_CIRCUIT_OPEN = 3
EXIT_PUBLISH_FAILED = 4


def run_worker(config_file: Path | None, http: bool = False) -> int:
    """The worker; with `http`, the HTTP API too, in this process, sharing its model and batches."""
    with started_service(config_file, "labelstream.run") as (settings, health):
        return _run_with_ops(settings, health, http)


def _run_with_ops(settings: Settings, health: HealthState, http: bool = False) -> int:
    labeler = build_labeler(settings)
    health.model_loaded()
    health.classifiers_built()
    warm_up_seconds = labeler.model.warm_up()
    log.info("model_ready", model=labeler.model.ref.model_dump(), device=str(labeler.model.device),
             load_seconds=round(labeler.model.load_seconds, 2), warm_up_seconds=warm_up_seconds,
             taxonomies=labeler.registry.names(), preprocess=settings.preprocess.mode,
             dedupe_entries=settings.cache.max_entries)
    producer = output_producer(settings)
    publisher = OutputPublisher(producer, settings.topics, labeler.model.ref, settings.kafka.ack_wait_s(),
                                settings.kafka.group_id)
    consumer = build_consumer(settings.kafka, read_committed=settings.delivery == "exactly_once")
    # With the API, one engine serves both: HTTP and Kafka items share its batches and the one model.
    engine = InferenceEngine(labeler, settings, health).start() if http else None
    sinks = build_sinks(settings, labeler.model.ref)
    worker = Worker(settings, labeler, ImageFetcher(settings.s3, settings.fetch), consumer, publisher, health, engine,
                    sinks=sinks)
    _install_signal_handlers(worker)
    api = api_server(settings, labeler, engine, health, kafka=True).start() if engine is not None else None
    # Taxonomy hot reload (files and the taxonomies topic) runs beside the worker.
    from consumers.taxonomy_feed import start_taxonomy_updates

    taxonomy_updates = start_taxonomy_updates(settings, labeler)
    try:
        # After the taxonomies topic caught up, so its documents' routes are checked too.
        _require_route_topics(consumer, labeler)
        code = _run_until_stopped(worker)
    finally:
        if api is not None:
            api.stop()
        if engine is not None:
            engine.stop()
        taxonomy_updates.stop()
        consumer.close(autocommit=False)
        producer.close(timeout=settings.kafka.produce_timeout_s)
    log.info("stopped", exit_code=code)
    return code


def _require_route_topics(consumer: KafkaConsumer, labeler: Labeler) -> None:
    registry = labeler.registry
    classifiers = [registry.get(name) for name in registry.names()]
    require_route_topics(consumer.topics(), classifiers)


def _run_until_stopped(worker: Worker) -> int:
    try:
        drained = worker.run()
    except CircuitOpenError as exc:
        # The held dead letters and everything after them stay uncommitted:
        # once the deploy is fixed, a restart reads them again.
        log.error("circuit_open", reason=exc.message, exit_code=EXIT_CIRCUIT_OPEN)
        return EXIT_CIRCUIT_OPEN
    except PublishError as exc:
        log.error("publish_failed", error=exc.message, exit_code=EXIT_PUBLISH_FAILED)
        return EXIT_PUBLISH_FAILED
    return EXIT_DRAINED if drained else EXIT_ABANDONED


def output_producer(settings: Settings) -> KafkaProducer:
    """A plain producer, or a transactional one for exactly-once delivery."""
    if settings.delivery != "exactly_once":
        return build_producer(settings.kafka)
    transactional_id = settings.kafka.transactional_id or f"{settings.kafka.group_id}-{socket.gethostname()}"
    producer = build_transactional_producer(settings.kafka, transactional_id)
    # Fences a crashed predecessor with the same id and aborts its open transaction.
    producer.init_transactions()
    log.info("transactions_ready", transactional_id=transactional_id)
    return producer


def _install_signal_handlers(worker: Worker) -> None:
    received: list[int] = []

    def handle(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        if len(received) == 1:
            log.info("stop_requested", signal=signal.Signals(signum).name)
            worker.request_stop()
            return
        # A second signal means "now": leave without committing unfinished work.
        log.warning("forced_exit", signal=signal.Signals(signum).name, exit_code=128 + signum)
        sys.stderr.flush()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
