"""The dataset manifest: label records as Parquet files under an S3 prefix.

Rows are buffered per input partition and written in *rolls*. A roll covers a
contiguous range of input offsets [first, last], every one of them finished,
and becomes one file per (taxonomy, date) among its rows:

    <prefix>taxonomy=<name>/date=<YYYY-MM-DD>/<topic>-<partition>-<first:020d>-<last:020d>.parquet

The date is the input record's timestamp (UTC), so a redelivered record lands
in the same partition. Each file is one PutObject (multipart above 8 MiB,
completed last), so S3 never shows a partial file.

Exactly the same files after a crash: before its files, a roll writes an
empty marker object `<prefix>_rolls/<topic>/<partition>/<first:020d>-<last:020d>`.
The group's committed offset never passes the first offset of a roll that is
not completely written (`stage` caps it), so it is always a roll boundary.
When a partition is (re)assigned, the markers at or after the committed offset
are the rolls a predecessor started: they *pin* the next rolls' ranges, and
the redelivered records roll into the very same file names, overwriting them
instead of adding rows twice.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import structlog
from boto3.s3.transfer import TransferConfig
from kafka import TopicPartition
from kafka.errors import KafkaError

from consumers.publisher import label_record
from consumers.records import Outcome
from consumers.sinks import s3_errors
from pipeline import metrics
from pipeline.config import ManifestSinkSettings, RetrySettings
from pipeline.errors import PublishError
from pipeline.retry import RetryOutcome, call_with_retries
from schemas.labels import ModelRef
from schemas.manifest import manifest_row, manifest_table, partition_date

log = structlog.get_logger("labelstream.manifest")

CommittedLookup = Callable[[TopicPartition], "int | None"]
_MARKER_NAME = re.compile(r"^(\d{20})-(\d{20})$")
# boto3's default: one PutObject below it; above it a multipart upload, completed last.
_TRANSFER = TransferConfig(multipart_threshold=8 * 1024 * 1024)


@dataclass(frozen=True)
class Roll:
    first: int
    last: int

    def name(self) -> str:
        return f"{self.first:020d}-{self.last:020d}"


@dataclass(frozen=True)
class Row:
    offset: int
    request_id: str
    taxonomy: str
    date: str
    values: dict[str, Any]
    embedding: np.ndarray | None
    added: float


@dataclass
class PartitionBuffer:
    """One input partition's rows waiting for their roll, and the rolls a predecessor pinned."""

    # The first offset of the next roll; None until loaded from the committed offset.
    range_start: int | None = None
    pins: list[Roll] = field(default_factory=list)
    # (offset, request id) -> row: a row staged twice (an aborted transaction's retry) is kept once.
    rows: dict[tuple[int, str], Row] = field(default_factory=dict)

    @property
    def loaded(self) -> bool:
        return self.range_start is not None

    def ready(self, position: int) -> list[Row]:
        """Rows below `position` (every offset below it is finished), in offset order."""
        return sorted((r for r in self.rows.values() if r.offset < position), key=lambda r: (r.offset, r.request_id))


@dataclass(frozen=True)
class _Written:
    """A roll written since the last confirm, kept so an aborted transaction can undo it."""

    partition: TopicPartition
    roll: Roll
    range_start: int
    pins: list[Roll]
    rows: dict[tuple[int, str], Row]


class ManifestSink:
    def __init__(
        self,
        settings: ManifestSinkSettings,
        s3_client: Any,
        retry: RetrySettings,
        wait_s: float,
        model: ModelRef,
        max_held_offsets: int,
    ) -> None:
        assert settings.uri is not None
        self._settings = settings
        self._s3 = s3_client
        self._retry = retry
        self._wait_s = wait_s
        self._model = model
        # Offsets held uncommitted for buffered rows count against worker.max_in_flight: past this
        # many, every ready row is rolled at once, or the worker would pause waiting for the age limit.
        self._max_held_offsets = max_held_offsets
        self.bucket, _, self.prefix = settings.uri.removeprefix("s3://").partition("/")
        self._buffers: dict[TopicPartition, PartitionBuffer] = {}
        self._written: list[_Written] = []

    # -- what the Checkpoint calls ----------------------------------------------------------

    def stage(
        self,
        outcomes: list[Outcome],
        offsets: dict[TopicPartition, int],
        roll: Collection[TopicPartition],
        committed: CommittedLookup | None,
    ) -> dict[TopicPartition, int]:
        """Buffer the outcomes' rows, write the rolls that are due, and cap `offsets`.

        `offsets` are the positions the tracker would commit (everything below
        is finished); `roll` names partitions to flush now (drain, revocation);
        `committed` looks up the group's committed offset, None inside a
        rebalance callback (a partition not loaded yet is then not committed).
        Raises PublishError when a roll cannot be written; the rows stay buffered.
        """
        for outcome in outcomes:
            self._add(outcome)
        deadline = time.monotonic() + self._wait_s
        loaded = {tp: p for tp, p in offsets.items() if self._ensure_loaded(tp, committed, deadline)}
        held = sum(p - _start(self._buffers[tp]) for tp, p in loaded.items())
        pressed = held >= self._max_held_offsets
        capped = {}
        for tp, position in loaded.items():
            buffer = self._buffers[tp]
            self._roll_due(tp, buffer, position, pressed or tp in roll, deadline)
            capped[tp] = _cap(buffer, position)
        metrics.MANIFEST_BUFFERED_ROWS.set(self.buffered_rows())
        return capped

    def confirm(self) -> None:
        self._written = []

    def rollback(self) -> None:
        """The transaction that was to commit the written rolls aborted: roll the same ranges again."""
        by_partition: dict[TopicPartition, list[_Written]] = {}
        for written in self._written:
            by_partition.setdefault(written.partition, []).append(written)
        for tp, rolls in by_partition.items():
            buffer = self._buffers.get(tp)
            if buffer is None:
                continue
            for written in rolls:
                buffer.rows.update(written.rows)
            later_pins = [p for p in rolls[0].pins if p.first > rolls[-1].roll.last]
            buffer.pins = [w.roll for w in rolls] + later_pins
            buffer.range_start = rolls[0].range_start
        self._written = []

    def forget(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._buffers.pop(tp, None)
        metrics.MANIFEST_BUFFERED_ROWS.set(self.buffered_rows())

    def buffered_rows(self) -> int:
        return sum(len(b.rows) for b in self._buffers.values())

    # -- buffering ---------------------------------------------------------------------------------

    def _add(self, outcome: Outcome) -> None:
        item, labels = outcome.item, outcome.labels
        if labels is None or item.request is None:
            return
        if self._settings.taxonomies and labels.taxonomy.name not in self._settings.taxonomies:
            return
        buffer = self._buffers.setdefault(item.ticket.partition, PartitionBuffer())
        if buffer.range_start is not None and item.offset < buffer.range_start:
            return  # already in a written file
        source = item.request.image
        image_uri = None if source.base64 is not None else source.describe()
        record = label_record(outcome, self._model)
        embedding = labels.embedding if self._settings.embeddings else None
        buffer.rows[(item.offset, item.request.id)] = Row(
            item.offset, item.request.id, labels.taxonomy.name, partition_date(item.timestamp_ms),
            manifest_row(record, image_uri, item.timestamp_ms), embedding, time.monotonic(),
        )

    def _ensure_loaded(self, tp: TopicPartition, committed: CommittedLookup | None, deadline: float) -> bool:
        buffer = self._buffers.setdefault(tp, PartitionBuffer())
        return buffer.loaded or (committed is not None and self._load(tp, buffer, committed, deadline))

    def _load(self, tp: TopicPartition, buffer: PartitionBuffer, committed: CommittedLookup, deadline: float) -> bool:
        """Start the partition's rolls at the group's committed offset, pinned to a predecessor's markers."""
        try:
            start = committed(tp)
        except KafkaError as exc:
            log.warning("manifest_committed_offset_unknown", partition=_name(tp), error=str(exc))
            return False
        start = start or 0
        buffer.pins = _chain(self._retried(lambda: self._list_markers(tp, start), deadline), start)
        buffer.range_start = start
        # Rows staged before the load are at or after the committed offset: nothing to drop.
        if buffer.pins:
            log.info("manifest_rolls_pinned", partition=_name(tp), committed=start,
                     rolls=[p.name() for p in buffer.pins])
        return True

    # -- rolling -----------------------------------------------------------------------------------

    def _roll_due(self, tp: TopicPartition, buffer: PartitionBuffer, position: int, force: bool, deadline: float) -> None:
        while (roll := self._next_roll(buffer, position, force)) is not None:
            self._write_roll(tp, buffer, roll, deadline)

    def _next_roll(self, buffer: PartitionBuffer, position: int, force: bool) -> Roll | None:
        """The next range to write, if one is due and every offset in it is finished."""
        assert buffer.range_start is not None
        if buffer.pins:
            pin = buffer.pins[0]
            # Offsets before a pinned roll that its writer had no rows for: rows there now get a roll of their own.
            last = pin.first - 1 if pin.first > buffer.range_start else pin.last
            return Roll(buffer.range_start, last) if last < position else None
        ready = buffer.ready(position)
        if len(ready) >= self._settings.max_records:
            return Roll(buffer.range_start, ready[self._settings.max_records - 1].offset)
        aged = ready and time.monotonic() - min(r.added for r in ready) >= self._settings.max_age_s
        return Roll(buffer.range_start, position - 1) if ready and (force or aged) else None

    def _write_roll(self, tp: TopicPartition, buffer: PartitionBuffer, roll: Roll, deadline: float) -> None:
        started = time.perf_counter()
        rows = {key: row for key, row in buffer.rows.items() if roll.first <= row.offset <= roll.last}
        pinned = bool(buffer.pins) and buffer.pins[0] == roll
        if rows or pinned:
            if not pinned:
                self._retried(lambda: self._put(self._marker_key(tp, roll), b""), deadline)
            for (taxonomy, date), group in _grouped(rows.values()).items():
                self._write_file(self._file_key(tp, roll, taxonomy, date), taxonomy, group, deadline)
            metrics.MANIFEST_ROLL_SECONDS.observe(time.perf_counter() - started)
            log.info("manifest_rolled", partition=_name(tp), first=roll.first, last=roll.last, rows=len(rows))
        self._written.append(_Written(tp, roll, roll.first, list(buffer.pins), rows))
        for key in rows:
            del buffer.rows[key]
        buffer.range_start = roll.last + 1
        if pinned or (buffer.pins and buffer.pins[0].last <= roll.last):
            buffer.pins.pop(0)

    def _write_file(self, key: str, taxonomy: str, rows: list[Row], deadline: float) -> None:
        embeddings = [r.embedding for r in rows if r.embedding is not None]
        table = manifest_table([r.values for r in rows], embeddings if len(embeddings) == len(rows) else None)
        sink = io.BytesIO()
        compression = None if self._settings.compression == "none" else self._settings.compression
        pq.write_table(table, sink, compression=compression)
        body = sink.getvalue()
        self._retried(lambda: self._put(key, body), deadline)
        metrics.MANIFEST_FILES.labels(taxonomy=taxonomy).inc()
        metrics.MANIFEST_ROWS.labels(taxonomy=taxonomy).inc(len(rows))
        metrics.MANIFEST_BYTES.inc(len(body))

    # -- S3 ------------------------------------------------------------------------------------------

    def _put(self, key: str, body: bytes) -> None:
        with s3_errors(f"write s3://{self.bucket}/{key}"):
            self._s3.upload_fileobj(io.BytesIO(body), self.bucket, key, Config=_TRANSFER)

    def _list_markers(self, tp: TopicPartition, start: int) -> list[Roll]:
        folder = self._marker_folder(tp)
        rolls = []
        paginator = self._s3.get_paginator("list_objects_v2")
        # Names sort by first offset, so StartAfter skips every roll below the committed offset.
        pages = paginator.paginate(Bucket=self.bucket, Prefix=folder, StartAfter=f"{folder}{start:020d}")
        with s3_errors(f"list s3://{self.bucket}/{folder}"):
            for page in pages:
                for entry in page.get("Contents", []):
                    match = _MARKER_NAME.match(entry["Key"][len(folder):])
                    if match:
                        rolls.append(Roll(int(match[1]), int(match[2])))
        return rolls

    def _retried(self, operation: Callable[[], Any], deadline: float) -> Any:
        budget = max(deadline - time.monotonic(), 0.001)
        try:
            result, _ = call_with_retries(operation, self._retry.model_copy(update={"budget_s": budget}))
        except RetryOutcome as stopped:
            error = stopped.error
            raise PublishError(f"manifest: {error.message}", code=error.code, retryable=error.retryable) from error
        return result

    def _marker_folder(self, tp: TopicPartition) -> str:
        return f"{self.prefix}_rolls/{tp.topic}/{tp.partition}/"

    def _marker_key(self, tp: TopicPartition, roll: Roll) -> str:
        return f"{self._marker_folder(tp)}{roll.name()}"

    def _file_key(self, tp: TopicPartition, roll: Roll, taxonomy: str, date: str) -> str:
        return f"{self.prefix}taxonomy={taxonomy}/date={date}/{tp.topic}-{tp.partition}-{roll.name()}.parquet"


def _cap(buffer: PartitionBuffer, position: int) -> int:
    """Never commit past a buffered row or an unwritten pinned roll: commits land on roll boundaries."""
    assert buffer.range_start is not None
    if buffer.pins or any(row.offset < position for row in buffer.rows.values()):
        return min(position, buffer.range_start)
    # Nothing below `position` is waiting: an empty roll, so the next one starts there.
    buffer.range_start = max(buffer.range_start, position)
    return position


def _start(buffer: PartitionBuffer) -> int:
    assert buffer.range_start is not None
    return buffer.range_start


def _chain(rolls: list[Roll], start: int) -> list[Roll]:
    """The markers as one ordered, non-overlapping chain from `start`."""
    chain: list[Roll] = []
    for roll in sorted(rolls, key=lambda r: (r.first, r.last)):
        if roll.first >= start and roll.last >= roll.first and (not chain or roll.first > chain[-1].last):
            chain.append(roll)
    return chain


def _grouped(rows: Collection[Row]) -> dict[tuple[str, str], list[Row]]:
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in sorted(rows, key=lambda r: (r.offset, r.request_id)):
        groups.setdefault((row.taxonomy, row.date), []).append(row)
    return groups


def _name(tp: TopicPartition) -> str:
    return f"{tp.topic}:{tp.partition}"
