"""The embedding record published to the embeddings topic."""

from __future__ import annotations

import base64
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from schemas.labels import ModelRef


class EmbeddingRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    model: ModelRef
    dim: int
    dtype: Literal["float32"] = "float32"
    # base64 of the vector as little-endian float32 bytes.
    encoding: Literal["base64"] = "base64"
    vector: str

    @classmethod
    def from_vector(cls, record_id: str, model: ModelRef, vector: np.ndarray) -> EmbeddingRecord:
        raw = np.ascontiguousarray(vector, dtype="<f4").tobytes()
        return cls(id=record_id, model=model, dim=int(vector.shape[0]), vector=base64.b64encode(raw).decode("ascii"))

    def to_vector(self) -> np.ndarray:
        return np.frombuffer(base64.b64decode(self.vector), dtype="<f4")
