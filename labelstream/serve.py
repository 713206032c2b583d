"""`labelstream serve`: the HTTP API alone, with the model, the inference engine and the ops server.

`labelstream run --http` (labelstream/worker_main.py) runs the same app beside
the Kafka worker in one process, sharing one Labeler, model and engine.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType

import structlog

from api.app import ApiContext, create_app
from api.server import ApiServer
from labelstream.service_start import started_service
from pipeline.config import Settings
from pipeline.fetch import ImageFetcher
from pipeline.health import HealthState
from pipeline.inference import InferenceEngine
from pipeline.labeler import Labeler, build_labeler

log = structlog.get_logger("labelstream.serve")


def run_serve(config_file: Path | None) -> int:
    with started_service(config_file, "labelstream.serve") as (settings, health):
        labeler = build_labeler(settings)
        health.model_loaded()
        health.classifiers_built()
        labeler.model.warm_up()
        engine = InferenceEngine(labeler, settings, health).start()
        try:
            server = api_server(settings, labeler, engine, health, kafka=False).start()
            log.info("serving", port=server.port, model=labeler.model.ref.model_dump(),
                     taxonomies=labeler.registry.names())
            _wait_for_signal()
            health.stopping()
            server.stop()
        finally:
            health.stopping()
            engine.stop()
    log.info("stopped", exit_code=0)
    return 0


def api_server(settings: Settings, labeler: Labeler, engine: InferenceEngine, health: HealthState,
               kafka: bool) -> ApiServer:
    """The API over an already loaded labeler and a running engine."""
    context = ApiContext(settings, labeler, engine, ImageFetcher(settings.s3, settings.fetch), health, kafka=kafka)
    return ApiServer(create_app(context), settings.http)


def _wait_for_signal() -> None:
    stop = threading.Event()

    def handle(signum: int, frame: FrameType | None) -> None:
        log.info("stop_requested", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    while not stop.wait(0.5):
        pass
