"""The FastAPI app: /v1/embeddings, /v1/models, /v1/classify, plus the unauthenticated probes.

It holds no model of its own: every model call is a job on the process's one
InferenceEngine, the same one the Kafka worker feeds when both run together
(`labelstream run --http`).
"""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import dataclass, field
from typing import Annotated

import numpy as np
import structlog
import torch
from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response

from api.auth import KeyStore, bearer_token
from api.classifiers import InlineClassifiers
from api.errors import ApiError, install_error_handlers
from api.images import parse_image_inputs
from api.jobs import ClientGone, JobRunner
from api.limits import BodySizeLimit, as_inputs
from api.observe import RequestMetrics
from api.probes import install_probes
from api.rate_limit import RateLimiter, retry_after_header
from pipeline.classifier import ZeroShotClassifier
from pipeline.config import Settings
from pipeline.fetch import ImageFetcher
from pipeline.health import HealthState
from pipeline.inference import ImageJob, InferenceEngine, JobFactory, JobResult, TextJob
from pipeline.labeler import ImageLabels, Labeler
from schemas.labels import LabelScore
from schemas.openai import (
    Classification, ClassifyRequest, ClassifyResponse, Embedding, EmbeddingRequest, EmbeddingResponse, ModelCard,
    ModelList, Usage, route_out,
)  # fmt: skip

log = structlog.get_logger("labelstream.api")


@dataclass
class ApiContext:
    settings: Settings
    labeler: Labeler
    engine: InferenceEngine
    fetcher: ImageFetcher
    health: HealthState
    # True when a Kafka worker shares the process (readiness then needs partitions).
    kafka: bool = False
    started: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        http = self.settings.http
        self.keys = KeyStore.from_settings(http)
        self.limiter = RateLimiter(http.rate_limit.per_second, http.rate_limit.burst)
        self.runner = JobRunner(self.engine, self.labeler, self.fetcher, self.settings.fetch.threads,
                                http.request_timeout_s)
        self.inline = InlineClassifiers(self.labeler, http.classifier_cache_entries)

    @property
    def model_ids(self) -> list[str]:
        """The id to pass as `model` first (open_clip's name, or a config file's stem), then aliases."""
        ids = [self.labeler.model.source.open_clip_name, *self.settings.http.model_aliases]
        return list(dict.fromkeys(ids))


def create_app(context: ApiContext) -> FastAPI:
    app = FastAPI(title="labelstream", version="1", description="OpenAI-compatible embeddings and zero-shot "
                  "classification, sharing one model with the Kafka stream.")
    app.state.context = context
    install_error_handlers(app)
    app.add_exception_handler(ClientGone, _client_gone)
    install_probes(app, context.health, context.kafka)
    _add_routes(app)
    # Outermost first: count every answer, including the size limit's 413.
    app.add_middleware(BodySizeLimit, max_bytes=context.settings.http.max_body_bytes)
    app.add_middleware(RequestMetrics)
    if not context.keys.digests:
        log.warning("http_no_api_keys", hint="set http.api_keys or http.api_key_hashes_file; every /v1 call gets 401")
    return app


def _context(request: Request) -> ApiContext:
    return request.app.state.context  # type: ignore[no-any-return]


def authorize(request: Request) -> str:
    """The caller's key id; 401 without a valid key, 429 over its rate limit."""
    context = _context(request)
    token = bearer_token(request.headers.get("authorization"))
    key_id = context.keys.identify(token) if token is not None else None
    if key_id is None:
        message = "missing API key: send Authorization: Bearer <key>" if token is None else "invalid API key"
        raise ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    wait_s = context.limiter.take(key_id)
    if wait_s is not None:
        raise ApiError(429, f"rate limit of {context.limiter.per_second:g} requests/s exceeded for this key",
                       code="rate_limit_exceeded", headers=retry_after_header(wait_s))
    return key_id


Authorized = Annotated[str, Depends(authorize)]


def _add_routes(app: FastAPI) -> None:
    @app.get("/v1/models", response_model=ModelList)
    def list_models(request: Request, key: Authorized) -> ModelList:
        context = _context(request)
        return ModelList(data=[ModelCard(id=model_id, created=context.started) for model_id in context.model_ids])

    @app.post("/v1/embeddings", response_model=EmbeddingResponse)
    async def embeddings(body: EmbeddingRequest, request: Request, key: Authorized) -> EmbeddingResponse:
        context = _context(request)
        model_id = _checked_model(context, body.model)
        _check_dimensions(context, body.dimensions)
        inputs = as_inputs(body.input, context.settings.http.max_inputs)
        if body.modality == "image":
            results = await _image_results(context, request, inputs, None)
            usage = Usage(prompt_tokens=0, total_tokens=0, images=len(inputs))
        else:
            results = await context.runner.run(request, [_text_job(text) for text in inputs])
            tokens = count_tokens(context.labeler, inputs)
            usage = Usage(prompt_tokens=tokens, total_tokens=tokens)
        data = [Embedding(index=i, embedding=encode_vector(r.embedding, body.encoding_format))
                for i, r in enumerate(results)]  # fmt: skip
        return EmbeddingResponse(data=data, model=model_id, usage=usage)

    @app.post("/v1/classify", response_model=ClassifyResponse)
    async def classify(body: ClassifyRequest, request: Request, key: Authorized) -> ClassifyResponse:
        context = _context(request)
        model_id = _checked_model(context, body.model) if body.model is not None else context.model_ids[0]
        inputs = as_inputs(body.input, context.settings.http.max_inputs)
        classifier = await asyncio.get_running_loop().run_in_executor(None, context.inline.resolve, body)
        results = await _image_results(context, request, inputs, classifier)
        data = [_classification(i, r.labels) for i, r in enumerate(results) if r.labels is not None]
        return ClassifyResponse(data=data, model=model_id, usage=Usage(prompt_tokens=0, total_tokens=0,
                                                                        images=len(inputs)))


async def _image_results(context: ApiContext, request: Request, inputs: list[str],
                         classifier: ZeroShotClassifier | None) -> list[JobResult]:
    parsed = parse_image_inputs(inputs, context.settings)
    prepared = await context.runner.prepare_images(parsed)
    return await context.runner.run(request, [_image_job(p.pixels, classifier) for p in prepared])


def _image_job(pixels: torch.Tensor | None, classifier: ZeroShotClassifier | None) -> JobFactory:
    assert pixels is not None
    return lambda done, claim: ImageJob(pixels, classifier, "http", done=done, claim=claim)


def _text_job(text: str) -> JobFactory:
    return lambda done, claim: TextJob(text, "http", done=done, claim=claim)


def _checked_model(context: ApiContext, requested: str) -> str:
    if requested not in context.model_ids:
        raise ApiError(404, f"the model {requested!r} does not exist; this server serves {context.model_ids}",
                       code="model_not_found", param="model")
    return requested


def _check_dimensions(context: ApiContext, dimensions: int | None) -> None:
    if dimensions is None:
        return
    # Every classifier's weights have one row per embedding dimension.
    size = int(context.labeler.classifier_for(None).weights.shape[0])
    if dimensions != size:
        raise ApiError(400, f"this model's embeddings have {size} dimensions; truncating them is not supported",
                       code="dimensions.unsupported", param="dimensions")


def encode_vector(vector: np.ndarray | None, encoding_format: str) -> list[float] | str:
    """float: a JSON list; base64: little-endian float32 bytes, as the openai client decodes them."""
    assert vector is not None
    as_f32 = np.asarray(vector, dtype="<f4")
    if encoding_format == "base64":
        return base64.b64encode(as_f32.tobytes()).decode("ascii")
    return [float(x) for x in as_f32]


def count_tokens(labeler: Labeler, texts: list[str]) -> int:
    """Tokens the text tower sees: start and end tokens included, padding (id 0) not."""
    tokens = labeler.model.tokenizer(texts)
    return int((tokens != 0).sum().item())


def _classification(index: int, labels: ImageLabels) -> Classification:
    selected = labels.selected
    return Classification(
        index=index,
        taxonomy=labels.taxonomy,
        mode="single_label" if selected is None else "multi_label",
        labels=[LabelScore(label=name, score=score) for name, score in labels.labels],
        selected=None if selected is None else [LabelScore(label=name, score=score) for name, score in selected],
        route=route_out(labels.route),
    )


async def _client_gone(request: Request, exc: Exception) -> Response:
    # Nobody reads this answer; the status only marks the request in metrics.
    return Response(status_code=499)
