"""The Parquet schema of the dataset manifest: the one definition, documented in docs/dataset-sinks.md.

Stable: columns are only ever added, never renamed, retyped or dropped, and a
change bumps SCHEMA_VERSION (written to every file's key-value metadata).
The Hive partition columns `taxonomy` and `date` live in the path only, so
no column in the file shares their names.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import numpy as np
import pyarrow as pa

from schemas.labels import LabelRecord, LabelScore

SCHEMA_VERSION = "1"
METADATA_SCHEMA_VERSION = b"labelstream.schema_version"
METADATA_EMBEDDING_DIM = b"labelstream.embedding_dim"
# A record without a usable Kafka timestamp lands in this date partition.
UNKNOWN_DATE = "1970-01-01"

_SCORE = pa.struct([pa.field("label", pa.string(), nullable=False), pa.field("score", pa.float64(), nullable=False)])
_COLUMNS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("taxonomy_name", pa.string(), nullable=False),
    pa.field("taxonomy_version", pa.string(), nullable=False),
    pa.field("model_name", pa.string(), nullable=False),
    pa.field("model_pretrained", pa.string()),
    pa.field("mode", pa.string(), nullable=False),
    pa.field("top_label", pa.string(), nullable=False),
    pa.field("top_score", pa.float64(), nullable=False),
    pa.field("labels", pa.list_(_SCORE), nullable=False),
    pa.field("selected", pa.list_(_SCORE)),
    pa.field("route", pa.string()),
    pa.field("metadata_json", pa.string(), nullable=False),
    pa.field("image_uri", pa.string()),
    pa.field("cache_hit", pa.bool_(), nullable=False),
    pa.field("source_topic", pa.string(), nullable=False),
    pa.field("source_partition", pa.int32(), nullable=False),
    pa.field("source_offset", pa.int64(), nullable=False),
    pa.field("source_timestamp", pa.timestamp("ms", tz="UTC")),
]


def manifest_schema(embedding_dim: int | None) -> pa.Schema:
    """The file schema; with `embedding_dim`, an `embedding` column of fixed_size_list<float32>[dim]."""
    fields = list(_COLUMNS)
    metadata = {METADATA_SCHEMA_VERSION: SCHEMA_VERSION.encode()}
    if embedding_dim is not None:
        fields.append(pa.field("embedding", pa.list_(pa.float32(), embedding_dim), nullable=False))
        metadata[METADATA_EMBEDDING_DIM] = str(embedding_dim).encode()
    return pa.schema(fields, metadata=metadata)


def manifest_row(label: LabelRecord, image_uri: str | None, timestamp_ms: int | None) -> dict[str, Any]:
    """One row but the embedding, from the label record that went to the labels topic."""
    assert label.source is not None, "manifest rows come from Kafka inputs"
    return {
        "id": label.id,
        "taxonomy_name": label.taxonomy.name,
        "taxonomy_version": label.taxonomy.version,
        "model_name": label.model.name,
        "model_pretrained": label.model.pretrained,
        "mode": label.mode,
        "top_label": label.labels[0].label,
        "top_score": label.labels[0].score,
        "labels": _scores(label.labels),
        "selected": None if label.selected is None else _scores(label.selected),
        "route": getattr(label, "route", None),
        "metadata_json": json.dumps(label.metadata, sort_keys=True, separators=(",", ":")),
        "image_uri": image_uri,
        "cache_hit": label.cache_hit,
        "source_topic": label.source.topic,
        "source_partition": label.source.partition,
        "source_offset": label.source.offset,
        "source_timestamp": _timestamp(timestamp_ms),
    }


def partition_date(timestamp_ms: int | None) -> str:
    """The `date=` partition: the input record's UTC date, so a redelivered record lands in the same one."""
    moment = _timestamp(timestamp_ms)
    return UNKNOWN_DATE if moment is None else moment.date().isoformat()


def manifest_table(rows: list[dict[str, Any]], embeddings: list[np.ndarray] | None) -> pa.Table:
    """The rows as a table; with `embeddings` (one per row, all one length), the embedding column too."""
    if not embeddings:
        return pa.Table.from_pylist(rows, schema=manifest_schema(None))
    dim = len(embeddings[0])
    schema = manifest_schema(dim)
    table = pa.Table.from_pylist(rows, schema=pa.schema(list(schema)[:-1]))
    # One contiguous float32 buffer: far faster than converting row by row.
    values = pa.array(np.stack(embeddings).astype(np.float32, copy=False).reshape(-1))
    column = pa.FixedSizeListArray.from_arrays(values, dim)
    return table.append_column(schema.field("embedding"), column).replace_schema_metadata(schema.metadata)


def _scores(scores: list[LabelScore]) -> list[dict[str, Any]]:
    return [{"label": s.label, "score": s.score} for s in scores]


def _timestamp(timestamp_ms: int | None) -> dt.datetime | None:
    # Kafka says -1 (or nothing) when a producer set no timestamp.
    if timestamp_ms is None or timestamp_ms < 0:
        return None
    return dt.datetime.fromtimestamp(timestamp_ms / 1000.0, tz=dt.UTC)
