"""Bodies of the OpenAI-compatible HTTP API (api/): requests, responses and the error shape.

Embeddings and the model list follow OpenAI's API, so the official `openai`
client works unchanged; `/v1/classify` is labelstream's own endpoint in the
same style. Request bodies forbid unknown fields, so a typo such as
`"modalty"` is a 400 naming the field rather than silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.labels import LabelScore, TaxonomyRef


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """Every error answer: `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorDetail


# -- embeddings -----------------------------------------------------------------


class EmbeddingRequest(_Body):
    # A string or a list of strings: texts, or with modality "image", image references
    # (http(s) URL, data:image/...;base64, URI, or s3://bucket/key).
    input: str | list[str]
    model: str
    encoding_format: Literal["float", "base64"] = "float"
    # infinity's convention, sent by clients through `extra_body`.
    modality: Literal["text", "image"] = "text"
    # Accepted when it equals the model's embedding size; the vectors are never truncated.
    dimensions: int | None = Field(None, gt=0)
    user: str | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    # Floats, or base64 of little-endian float32 bytes.
    embedding: list[float] | str


class Usage(BaseModel):
    # Text tokens (after the tokenizer's start/end tokens, truncated to the context length).
    prompt_tokens: int
    total_tokens: int
    images: int = 0


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


# -- models ---------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "labelstream"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- classify -------------------------------------------------------------------


class ClassifyRequest(_Body):
    # Image references, as for embeddings with modality "image".
    input: str | list[str]
    # Optional: the served model when omitted; checked like embeddings' `model` when given.
    model: str | None = None
    # A taxonomy the server has loaded; null (with no `labels`) means its default taxonomy.
    taxonomy: str | None = None
    # Inline class names instead of a taxonomy, each expanded with every template.
    labels: list[str] | None = None
    templates: list[str] | None = None
    mode: Literal["single_label", "multi_label"] = "single_label"
    # multi_label inline sets: the decision threshold of every class.
    threshold: float | None = Field(None, ge=0.0, le=1.0)
    top_k: int | None = Field(None, gt=0)


class RouteOut(BaseModel):
    rule: str
    topic: str
    headers: dict[str, str]
    priority: int | None
    scores: dict[str, float]


class Classification(BaseModel):
    object: Literal["classification"] = "classification"
    index: int
    taxonomy: TaxonomyRef
    mode: Literal["single_label", "multi_label"]
    # The same structure as a label record's `labels`: the taxonomy's top_k, highest first.
    labels: list[LabelScore]
    # multi_label only: every class at or above its threshold, highest first.
    selected: list[LabelScore] | None = None
    # The routing rule that would match, when the taxonomy has routes.
    route: RouteOut | None = None


class ClassifyResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Classification]
    model: str
    usage: Usage


def route_out(route: Any) -> RouteOut | None:
    """A pipeline.routing.RouteMatch (or None) as the response field."""
    if route is None:
        return None
    return RouteOut(rule=route.rule, topic=route.topic, headers=dict(route.headers), priority=route.priority,
                    scores={name: float(score) for name, score in route.scores.items()})
