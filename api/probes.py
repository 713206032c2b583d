"""/healthz, /readyz and /metrics on the API port, without a key: the ops server's answers.

`labelstream serve` has no consumer, so there readiness does not ask for
assigned partitions; every other check (model loaded, classifiers built,
inference not failing, not shutting down, live) is the worker's own.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import REGISTRY
from prometheus_client.exposition import choose_encoder

from pipeline.health import HealthState, Probe

_NO_PARTITIONS = "no partitions assigned"


def readiness(health: HealthState, kafka: bool) -> Probe:
    ok, details = health.readiness()
    if kafka:
        return Probe(ok, details)
    reasons = [reason for reason in details["reasons"] if reason != _NO_PARTITIONS]
    return Probe(not reasons, {**details, "reasons": reasons, "status": "ok" if not reasons else "failing"})


def probe_routes(health: HealthState, kafka: bool) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/healthz")
    def healthz() -> JSONResponse:
        return _probe_response(health.liveness())

    @router.get("/readyz")
    def readyz() -> JSONResponse:
        return _probe_response(readiness(health, kafka))

    @router.get("/metrics")
    def prometheus_metrics(request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept"))
        return Response(encoder(REGISTRY), media_type=content_type)

    return router


def _probe_response(probe: Probe) -> JSONResponse:
    ok, details = probe
    return JSONResponse(details, status_code=200 if ok else 503, headers={"Cache-Control": "no-store"})


def install_probes(app: FastAPI, health: HealthState, kafka: bool) -> None:
    app.include_router(probe_routes(health, kafka))
