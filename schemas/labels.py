"""The label record published to the labels topic."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ModelRef(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    pretrained: str | None


class TaxonomyRef(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    # Content hash of the normalised taxonomy together with the model identity.
    version: str


class LabelScore(BaseModel):
    model_config = ConfigDict(frozen=True)

    label: str
    score: float = Field(ge=0.0, le=1.0)


class SourceRef(BaseModel):
    """Where the request came from, so a label can be traced to its input."""

    model_config = ConfigDict(frozen=True)

    topic: str
    partition: int
    offset: int


class Timings(BaseModel):
    model_config = ConfigDict(frozen=True)

    fetch: float
    decode: float
    infer: float
    total: float


class LabelRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    metadata: dict[str, Any]
    model: ModelRef
    taxonomy: TaxonomyRef
    # The taxonomy's top_k, sorted by score, descending.
    labels: list[LabelScore]
    mode: Literal["single_label", "multi_label"] = "single_label"
    # multi_label only: every class whose score is at or above its threshold, highest first.
    selected: list[LabelScore] | None = None
    source: SourceRef | None
    timings_ms: Timings
    # True when a byte-identical image was labelled before and this record
    # reuses its embedding (decode and model skipped; see pipeline/dedupe.py).
    cache_hit: bool = False
    # The routing rule that sent this record to a route topic (schemas/routes.py);
    # None when the taxonomy has no routes or none of them matched.
    route: str | None = None
