"""Every message on every labelstream topic, as pydantic v2 models."""

from schemas.deadletter import DeadLetterHeaders
from schemas.embeddings import EmbeddingRecord
from schemas.labels import LabelRecord, LabelScore, ModelRef, SourceRef, TaxonomyRef, Timings
from schemas.requests import ImageSource, Request, S3Source
from schemas.routes import RoutedRecord

MESSAGE_TYPES = {
    "request": Request,
    "label_record": LabelRecord,
    "embedding_record": EmbeddingRecord,
    # Route topics (moderation triage) carry routed records.
    "routed_record": RoutedRecord,
    # Dead-letter records keep the original bytes; this models their headers.
    "dead_letter_headers": DeadLetterHeaders,
}

__all__ = [
    "MESSAGE_TYPES",
    "DeadLetterHeaders",
    "EmbeddingRecord",
    "ImageSource",
    "LabelRecord",
    "LabelScore",
    "ModelRef",
    "Request",
    "RoutedRecord",
    "S3Source",
    "SourceRef",
    "TaxonomyRef",
    "Timings",
]
