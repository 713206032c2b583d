"""`labelstream backfill s3://bucket/prefix/`: one request per image object already in a bucket.

The listing is streamed page by page (1,000 keys a page) and handled in chunks
of `CHUNK_SIZE` keys, in S3's key order:

  1. keep image objects (by extension, see `image_suffixes`) modified at or
     after `--since`;
  2. unless `--force`, read each candidate's tags concurrently and skip the
     ones whose marker tag (pipeline/object_tags.py) says they were labelled
     with this taxonomy version (which covers the model too);
  3. produce a request for each remaining one, at most `--rate` a second;
  4. wait for the broker's acknowledgements, then save the last key that is
     done (labelstream/backfill_state.py). Nothing after an unacknowledged
     request is ever marked done, so a rerun resumes exactly after it.

SIGINT/SIGTERM stop the listing at the next key; what was sent is flushed and
acknowledged, the position saved, and the exit status is 128 + the signal.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path, PurePosixPath
from types import FrameType
from typing import Any

import structlog
from botocore.exceptions import BotoCoreError, ClientError
from kafka import KafkaProducer
from kafka.errors import KafkaError
from tqdm import tqdm

from consumers.kafka_clients import build_producer
from labelstream.backfill_state import BackfillKey, BackfillState, default_state_path, load_state, save_state
from labelstream.logs import configure_logging
from labelstream.sources import parse_s3_uri
from labelstream.submit import request_id_for, s3_client
from pipeline.config import KafkaSettings, Settings, load_settings
from pipeline.errors import FetchError, LabelstreamError, PublishError
from pipeline.object_tags import is_labelled
from schemas.requests import ImageSource, Request, S3Source

PAGE_SIZE = 1000
CHUNK_SIZE = 100
TAG_THREADS = 16
DEFAULT_RATE = 200.0
# Bootstrapping kafka-python waits 30 s by default; an unreachable broker should be said sooner.
_MAX_BOOTSTRAP_MS = 10_000


@dataclass(frozen=True)
class BackfillOptions:
    uri: str
    taxonomy: str | None = None
    since: datetime | None = None
    force: bool = False
    rate: float = DEFAULT_RATE
    state_path: Path | None = None
    config_file: Path | None = None


def backfill(options: BackfillOptions) -> int:
    settings = load_settings(options.config_file)
    configure_logging(settings.log)
    bucket, prefix = parse_s3_uri(options.uri)
    key = BackfillKey(bucket, prefix, *taxonomy_version(settings, options.taxonomy), since_text(options.since))
    state_path = options.state_path or default_state_path(key)
    state = load_state(state_path, key)
    client = s3_client(settings.s3)
    require_objects(client, bucket, prefix, state)
    producer = open_producer(settings.kafka, settings.topics.requests)
    run = BackfillRun(
        settings=settings, client=client, producer=producer, state=state, state_path=state_path,
        accepts=ObjectFilter(image_suffixes(settings.image.allowed_formats), options.since).accepts,
        limiter=TokenBucket(options.rate), force=options.force,
    )
    try:
        return run.execute()
    finally:
        producer.close(timeout=settings.kafka.produce_timeout_s)


# -- what to request -----------------------------------------------------------------


def taxonomy_version(settings: Settings, name: str | None) -> tuple[str, str]:
    """The taxonomy's name and its version with the configured model; no weights are loaded.

    Without a name, the configured default taxonomy (taxonomy.default, else the first file, else ImageNet).
    """
    from pipeline.model import resolve_source
    from pipeline.taxonomy_store import default_name, find_configured, load_configured

    if name is None:
        loaded = load_configured(settings.taxonomy)
        chosen = default_name(settings.taxonomy, loaded)
        taxonomy = next(t for t in loaded if t.name == chosen)
    else:
        taxonomy = find_configured(settings.taxonomy, name)
    return taxonomy.name, taxonomy.version(resolve_source(settings.model).identity)


def image_suffixes(allowed_formats: tuple[str, ...]) -> frozenset[str]:
    """The file extensions Pillow maps to one of the worker's `image.allowed_formats`.

    With the defaults: .jpg .jpeg .jpe .jfif .png .apng .webp .gif .bmp .tif .tiff.
    """
    from PIL import Image

    Image.init()
    allowed = {name.upper() for name in allowed_formats}
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in allowed)


def parse_since(text: str) -> datetime:
    """`2024-05-01` or an ISO 8601 time; without a zone it is UTC. Compared with LastModified."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since {text!r}: expected a date (2024-05-01) or an ISO time (2024-05-01T12:00:00Z)") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def since_text(since: datetime | None) -> str | None:
    return None if since is None else since.astimezone(UTC).isoformat()


@dataclass(frozen=True)
class ObjectFilter:
    suffixes: frozenset[str]
    since: datetime | None

    def accepts(self, obj: dict[str, Any]) -> bool:
        if PurePosixPath(obj["Key"]).suffix.lower() not in self.suffixes:
            return False
        return self.since is None or obj["LastModified"] >= self.since


def build_request(bucket: str, key: str, taxonomy: str) -> Request:
    """The same id for the same object on every run (and as `labelstream submit` gives it)."""
    return Request(
        id=request_id_for(bucket, key),
        image=ImageSource(s3=S3Source(bucket=bucket, key=key)),
        taxonomy=taxonomy,
        metadata={"s3_uri": f"s3://{bucket}/{key}", "source": "backfill"},
    )


# -- rate limit and signals ------------------------------------------------------------


class TokenBucket:
    """At most `rate` tokens a second on average, in bursts of up to one second's worth; `rate <= 0`: no limit."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.tokens = self.capacity
        self._clock = clock
        self._updated = clock()

    def acquire(self, stop: threading.Event) -> bool:
        """Take one token, waiting for it; False when `stop` is set while waiting."""
        if self.rate <= 0:
            return True
        self._refill()
        if self.tokens < 1 and stop.wait((1 - self.tokens) / self.rate):
            return False
        self._refill()
        # Taken even when rounding left it a hair short: the debt delays the next token,
        # where waiting again for a tiny remainder could spin without the clock moving.
        self.tokens -= 1
        return True

    def _refill(self) -> None:
        now = self._clock()
        self.tokens = min(self.capacity, self.tokens + (now - self._updated) * self.rate)
        self._updated = now


class StopFlag(threading.Event):
    signum: int | None = None


@contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """The first SIGINT/SIGTERM sets the flag; a second one ends the process at once (the defaults are back)."""
    stop = StopFlag()
    watched = (signal.SIGINT, signal.SIGTERM)

    def handle(signum: int, _frame: FrameType | None) -> None:
        stop.signum = signum
        stop.set()
        for sig in watched:
            signal.signal(sig, signal.SIG_DFL)

    previous = {sig: signal.signal(sig, handle) for sig in watched}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# -- S3 and the broker -------------------------------------------------------------------


def list_objects(client: Any, bucket: str, prefix: str, start_after: str | None) -> Iterator[dict[str, Any]]:
    """Every object under `prefix` after `start_after`, in key order, one page in memory at a time."""
    params: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "PaginationConfig": {"PageSize": PAGE_SIZE}}
    if start_after:
        params["StartAfter"] = start_after
    with s3_errors(f"s3://{bucket}/{prefix}"):
        for page in client.get_paginator("list_objects_v2").paginate(**params):
            yield from page.get("Contents", [])


def require_objects(client: Any, bucket: str, prefix: str, state: BackfillState) -> None:
    """Fail before producing anything when the bucket is missing, or a new pass would list nothing."""
    with s3_errors(f"s3://{bucket}/{prefix}"):
        answer = client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    if not answer.get("KeyCount") and state.position is None:
        raise FetchError(f"s3://{bucket}/{prefix}: no objects", code="s3.not_found")


def object_tags(client: Any, bucket: str, key: str) -> dict[str, str] | None:
    """The object's tags; None when it was deleted since it was listed."""
    try:
        answer = client.get_object_tagging(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise _s3_error(exc, f"s3://{bucket}/{key}") from None
    except BotoCoreError as exc:
        raise FetchError(f"s3://{bucket}/{key}: {exc}", code="s3.connection_error", retryable=True) from None
    return {tag["Key"]: tag["Value"] for tag in answer.get("TagSet", [])}


@contextmanager
def s3_errors(where: str) -> Iterator[None]:
    try:
        yield
    except ClientError as exc:
        raise _s3_error(exc, where) from None
    except BotoCoreError as exc:
        raise FetchError(f"{where}: {exc}", code="s3.connection_error", retryable=True) from None


def _s3_error(exc: ClientError, where: str) -> FetchError:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    if code in ("NoSuchBucket", "404", "NotFound"):
        return FetchError(f"{where}: the bucket does not exist", code="s3.bucket_not_found")
    if code in ("AccessDenied", "403", "Forbidden"):
        hint = " (reading tags needs s3:GetObjectTagging; --force skips that check)"
        return FetchError(f"{where}: access denied{hint}", code="s3.access_denied")
    return FetchError(f"{where}: {code} {exc}", code="s3.error", retryable=True)


def open_producer(kafka: KafkaSettings, topic: str) -> KafkaProducer:
    """A producer that has reached the broker and found the requests topic."""
    wait_ms = min(kafka.request_timeout_ms, _MAX_BOOTSTRAP_MS)
    try:
        producer = build_producer(kafka, bootstrap_timeout_ms=wait_ms, max_block_ms=wait_ms)
    except KafkaError as exc:
        raise PublishError(f"cannot reach the broker at {kafka.bootstrap_servers}: {exc}", code="kafka.unreachable") from None
    try:
        producer.partitions_for(topic)
    except KafkaError as exc:
        producer.close(timeout=0)
        raise PublishError(f"requests topic {topic!r} is not available on {kafka.bootstrap_servers}: {exc}") from None
    return producer


# -- the run ---------------------------------------------------------------------------


@dataclass
class Done:
    """One listed key in a chunk, and what happened to it."""

    key: str
    outcome: str  # requested, skipped (already labelled), ignored (not an image, too old, or gone)
    sent: Any = None  # the producer's future, for requested keys


@dataclass
class BackfillRun:
    settings: Settings
    client: Any
    producer: KafkaProducer
    state: BackfillState
    state_path: Path
    accepts: Callable[[dict[str, Any]], bool]
    limiter: TokenBucket
    force: bool
    stop: StopFlag = field(default_factory=StopFlag)
    # Per run, not per module: structlog caches a proxy's logger on first use, and an
    # in-process caller (the tests) configures logging again for every run.
    log: Any = field(default_factory=lambda: structlog.get_logger("labelstream.backfill"))

    def execute(self) -> int:
        key = self.state.key
        self.log.info("backfill_started", uri=f"s3://{key.bucket}/{key.prefix}", resume_after=self.state.position,
                      taxonomy=key.taxonomy, taxonomy_version=key.taxonomy_version, state=str(self.state_path))
        save_state(self.state_path, self.state)  # an unwritable --state fails here, before any request
        listing = list_objects(self.client, key.bucket, key.prefix, self.state.position)
        with stop_on_signals() as self.stop, ThreadPoolExecutor(TAG_THREADS) as pool, self._progress() as bar:
            try:
                for chunk in iter(lambda: list(islice(listing, CHUNK_SIZE)), []):
                    self._checkpoint(self._handle(chunk, pool, bar))
                    bar.set_postfix(requested=self.state.requested, skipped=self.state.skipped,
                                    ignored=self.state.ignored, refresh=False)
                    if self.stop.is_set():
                        break
            except LabelstreamError:
                print(f"progress is saved; run the same command again to resume (state: {self.state_path})", file=sys.stderr)
                raise
        return self._interrupted() if self.stop.is_set() else self._completed()

    def _handle(self, chunk: list[dict[str, Any]], pool: ThreadPoolExecutor, bar: tqdm) -> list[Done]:
        labelled = self._labelled([obj["Key"] for obj in chunk if self.accepts(obj)], pool)
        done: list[Done] = []
        for obj in chunk:
            if self.stop.is_set():
                break
            outcome = self._outcome(obj, labelled)
            if outcome == "requested" and not self.limiter.acquire(self.stop):
                break
            done.append(Done(obj["Key"], outcome, self._send(obj["Key"]) if outcome == "requested" else None))
            bar.update()
        return done

    def _outcome(self, obj: dict[str, Any], labelled: dict[str, bool | None]) -> str:
        if not self.accepts(obj):
            return "ignored"
        verdict = labelled.get(obj["Key"], False)
        return "ignored" if verdict is None else "skipped" if verdict else "requested"

    def _labelled(self, keys: list[str], pool: ThreadPoolExecutor) -> dict[str, bool | None]:
        """Per key: True when its marker tag names this taxonomy version, None when the object is gone."""
        if self.force or not keys:
            return {}
        key = self.state.key
        tags = pool.map(lambda k: object_tags(self.client, key.bucket, k), keys)
        return {k: None if t is None else is_labelled(t, key.taxonomy, key.taxonomy_version) for k, t in zip(keys, tags)}

    def _send(self, key: str) -> Any:
        request = build_request(self.state.key.bucket, key, self.state.key.taxonomy)
        try:
            return self.producer.send(self.settings.topics.requests, key=request.id.encode(),
                                      value=request.model_dump_json().encode())
        except KafkaError as exc:
            return exc  # judged in _checkpoint, in order with the others

    def _checkpoint(self, done: list[Done]) -> None:
        """Wait for acknowledgements, then save the position after the last key that is done."""
        try:
            self.producer.flush(timeout=self.settings.kafka.produce_timeout_s)
        except KafkaError:
            pass  # the unacknowledged futures below say which keys are not done
        counts = {"requested": 0, "skipped": 0, "ignored": 0}
        last, failure = None, None
        for item in done:
            failure = _send_failure(item.sent)
            if failure:
                break
            counts[item.outcome] += 1
            last = item.key
        listed = sum(counts.values())
        self.state = self.state.advanced(last, listed=listed, **counts)
        save_state(self.state_path, self.state)
        if failure:
            raise PublishError(f"the request for s3://{self.state.key.bucket}/{done[listed].key} was not acknowledged: {failure}")

    def _completed(self) -> int:
        self.state = replace(self.state, completed=True)
        save_state(self.state_path, self.state)
        self.log.info("backfill_finished", **self._counts())
        key = self.state.key
        print(f"backfill of s3://{key.bucket}/{key.prefix} complete: {self._summary()}")
        return 0

    def _interrupted(self) -> int:
        name = signal.Signals(self.stop.signum or signal.SIGINT).name
        self.log.warning("backfill_interrupted", signal=name, position=self.state.position, **self._counts())
        print(
            f"backfill interrupted by {name} after {self.state.position!r}: {self._summary()}. "
            f"Run the same command again to resume after that key (state: {self.state_path})",
            file=sys.stderr,
        )
        return 128 + (self.stop.signum or signal.SIGINT)

    def _counts(self) -> dict[str, int]:
        s = self.state
        return {"listed": s.listed, "requested": s.requested, "skipped": s.skipped, "ignored": s.ignored}

    def _summary(self) -> str:
        c, key = self._counts(), self.state.key
        return (f"listed {c['listed']}, requested {c['requested']} to {self.settings.topics.requests}, "
                f"skipped {c['skipped']} already labelled with {key.taxonomy} version {key.taxonomy_version}, "
                f"ignored {c['ignored']} (not images, older than --since, or deleted)")

    @contextmanager
    def _progress(self) -> Iterator[tqdm]:
        with tqdm(desc="backfill", unit="key", file=sys.stderr, initial=self.state.listed, mininterval=0.5) as bar:
            yield bar


def _send_failure(sent: Any) -> str | None:
    """Why a request is not acknowledged, or None when it is (or none was sent)."""
    if sent is None:
        return None
    if isinstance(sent, Exception):
        return str(sent)
    if not sent.is_done:
        return "no acknowledgement in time"
    return str(sent.exception) if sent.failed() else None
