"""Hostile inputs (issue 4), end to end: every case through one real worker.

One `labelstream run` subprocess (tiny model, Tansu, moto S3) receives every
hostile case of the issue as its own record, interleaved with good requests.
Per input the test then checks, from the output topics alone, that there is
exactly one terminal output: a label record (with its embedding) or a dead
letter that carries a specific error code and stage, the original key, value
and headers byte for byte, and where it came from. The worker must still be
up at the end, commit up to the true end of the topic and stop cleanly.

A second, small worker runs beside it with URL sources left at their default
(off), for the `url.disabled` case. A separate run sends a 20 MiB record, more
than the worker's own producer may write, which must still end as one dead
letter. Last, in-process tests pin the parse and decode guards behind some cases.

S3 "access denied" needs a bucket the worker may not read: moto refuses a
bucket owned by another account when MOTO_S3_ALLOW_CROSSACCOUNT_ACCESS=false,
an environment variable of the server process, so this module starts its own
moto server with it instead of using the shared one.
"""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
import yaml
from kafka import KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord
from PIL import Image

from consumers.intake import MAX_JSON_DEPTH, max_request_bytes, parse_request
from labelstream.embedded import EmbeddedS3
from pipeline.config import ImageSettings, ModelSettings, Settings, TaxonomySettings
from pipeline.decode import MAX_ASPECT_RATIO, decode_image
from pipeline.errors import ImageError, RequestError
from pipeline.labeler import Labeler, build_labeler
from schemas.deadletter import DeadLetterHeaders
from schemas.embeddings import EmbeddingRecord
from schemas.labels import LabelRecord
from tests.worker_process import (
    WorkerProcess,
    committed_offsets,
    start_worker,
    topic_reader,
    true_end_offsets,
    wait_for_commits,
)

OTHER_ACCOUNT = "111111111111"
TAXONOMY_CLASSES = ["dog", "cat", "flower", "textile", "city street"]
TOP_K = 3
PARTITIONS = 2
MAX_BYTES = 2_000_000
MAX_INLINE_BYTES = 3_000_000
ALLOWED_FORMATS = ["JPEG", "PNG", "GIF", "WEBP", "TIFF"]  # BMP left out on purpose
BASE_TIMESTAMP_MS = 1_700_000_000_000
OUTPUTS_TIMEOUT_S = 90.0
SCORE_TOLERANCE = 1e-4
RED, BLUE = (255, 0, 0), (0, 0, 255)

LABEL = "labelled"


@dataclass(frozen=True)
class Expect:
    """A dead letter with this code and stage (and, when given, this text in its message)."""

    code: str
    stage: str
    message_part: str = ""


@dataclass
class Case:
    name: str
    value: bytes | None
    expect: Expect | str  # an Expect, or LABEL
    request_id: str | None = None  # the id the worker can know (a parsed request)
    key: bytes = b""
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    image: bytes | None = None  # the image bytes it names, where there are any


# --- images --------------------------------------------------------------------


def encode(im: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, fmt, **params)
    return buffer.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_declaring(width: int, height: int) -> bytes:
    """A valid PNG header declaring any size, with (almost) no pixel data behind it."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + png_chunk(b"IEND", b""))


def exif_rotated_jpeg(upright: Image.Image) -> bytes:
    """Stored sideways with EXIF orientation 6 ("rotate 90 degrees clockwise to view")."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif, quality=95)


def stored_pixels(data: bytes) -> Image.Image:
    """The decoded pixels exactly as stored: no EXIF orientation, first frame."""
    with Image.open(io.BytesIO(data)) as im:
        assert "transparency" not in im.info
        return im.convert("RGB")


def animated_gif(first: Image.Image, second: Image.Image) -> bytes:
    return encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)


def sixteen_bit_png() -> bytes:
    ramp = np.linspace(0, 65_535, 96 * 64, dtype=np.float64).reshape(64, 96).astype(np.uint16)
    data = encode(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    return data


def palette_png_with_transparency(photo: Image.Image) -> bytes:
    data = encode(photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=64), "PNG", transparency=0)
    assert "transparency" in Image.open(io.BytesIO(data)).info
    return data


def cmyk_jpeg(photo: Image.Image) -> bytes:
    data = encode(photo.convert("CMYK"), "JPEG", quality=90)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    return data


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


# --- a tiny web server for URL sources ------------------------------------------


class WebServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, photo: bytes) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.photo = photo
        self.seen: list[tuple[str, str]] = []  # (Host header, path)

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class _Handler(BaseHTTPRequestHandler):
    server: WebServer

    def do_GET(self) -> None:
        self.server.seen.append((self.headers.get("Host", ""), self.path))
        port = self.server.port
        redirects = {
            "/to-metadata": "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
            "/to-localhost": f"http://localhost:{port}/photo.jpg",
            "/to-private": "http://10.11.12.13/photo.jpg",
        }
        if self.path in redirects:
            self.send_response(302)
            self.send_header("Location", redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(self.server.photo)))
        self.end_headers()
        self.wfile.write(self.server.photo)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def web(sample_photos: list[Path]) -> Iterator[WebServer]:
    server = WebServer(sample_photos[0].read_bytes())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


# --- an S3 server that can deny access -------------------------------------------


@pytest.fixture(scope="module")
def strict_s3() -> Iterator[EmbeddedS3]:
    # The child process takes the environment as it is at start.
    previous = os.environ.get("MOTO_S3_ALLOW_CROSSACCOUNT_ACCESS")
    os.environ["MOTO_S3_ALLOW_CROSSACCOUNT_ACCESS"] = "false"
    try:
        server = EmbeddedS3()
        server.start()
    finally:
        if previous is None:
            del os.environ["MOTO_S3_ALLOW_CROSSACCOUNT_ACCESS"]
        else:
            os.environ["MOTO_S3_ALLOW_CROSSACCOUNT_ACCESS"] = previous
    yield server
    server.stop()


def s3_client_for(endpoint_url: str, account: str | None = None) -> Any:
    client = boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1")
    if account is not None:
        def as_account(request: Any, **_: Any) -> None:
            request.headers["x-moto-account-id"] = account

        client.meta.events.register("before-sign.s3.*", as_account)
    return client


@dataclass(frozen=True)
class Buckets:
    photos: str  # allowed, readable
    denied: str  # allowed, owned by another account
    missing: str  # allowed, does not exist
    outside: str  # exists and readable, but not in s3.allowed_buckets

    @property
    def allowed(self) -> list[str]:
        return [self.photos, self.denied, self.missing]


def make_buckets(endpoint_url: str, uid: str, photo: bytes) -> Buckets:
    buckets = Buckets(f"ls-photos-{uid}", f"ls-denied-{uid}", f"ls-missing-{uid}", f"ls-outside-{uid}")
    ours, theirs = s3_client_for(endpoint_url), s3_client_for(endpoint_url, OTHER_ACCOUNT)
    ours.create_bucket(Bucket=buckets.photos)
    ours.create_bucket(Bucket=buckets.outside)
    ours.put_object(Bucket=buckets.outside, Key="photo.jpg", Body=photo)
    theirs.create_bucket(Bucket=buckets.denied)
    theirs.put_object(Bucket=buckets.denied, Key="photo.jpg", Body=photo)
    return buckets


# --- the cases -------------------------------------------------------------------------


class CaseBook:
    """Builds the cases of one run; uploads the S3 objects they name."""

    def __init__(self, uid: str, s3: Any, buckets: Buckets, web_port: int) -> None:
        self.uid = uid
        self.s3 = s3
        self.buckets = buckets
        self.web_port = web_port
        self.cases: list[Case] = []

    def rid(self, name: str) -> str:
        return f"{name}-{self.uid}"

    def raw(self, name: str, value: bytes | None, expect: Expect | str) -> None:
        key = f"key-{name}".encode() + b"\x00\xfe"  # keys and headers are bytes, not text
        headers = [("case", name.encode()), ("trace", b"\x00\xff\x80" + name.encode())]
        self.cases.append(Case(name, value, expect, None, key, headers))

    def request(self, name: str, image: dict[str, Any], expect: Expect | str, **extra: Any) -> None:
        """A well-formed request: the worker knows its id whatever happens next."""
        document = {"id": self.rid(name), "image": image, "metadata": {"case": name}, **extra}
        self.raw(name, json.dumps(document).encode(), expect)
        self.cases[-1].request_id = self.rid(name)

    def s3_object(self, name: str, data: bytes, expect: Expect | str) -> None:
        key = f"hostile/{name}"
        self.s3.put_object(Bucket=self.buckets.photos, Key=key, Body=data)
        self.request(name, {"s3": {"bucket": self.buckets.photos, "key": key}}, expect)
        self.cases[-1].image = data

    def inline(self, name: str, data: bytes, expect: Expect | str) -> None:
        self.request(name, {"base64": base64.b64encode(data).decode("ascii")}, expect)
        self.cases[-1].image = data

    def url(self, name: str, url: str, expect: Expect | str) -> None:
        self.request(name, {"url": url}, expect)


def request_cases(book: CaseBook) -> None:
    photo = {"s3": {"bucket": book.buckets.photos, "key": "good/0.jpg"}}
    tiny = base64.b64encode(encode(Image.new("RGB", (8, 8), RED), "PNG")).decode("ascii")
    invalid = "request.invalid"
    book.raw("not_json", b"{this is not json", Expect("request.invalid_json", "parse"))
    book.raw("not_utf8", b'{"id": "\xff\xfe\x80", "image": {}}', Expect("request.not_utf8", "parse"))
    book.raw("tombstone", None, Expect("request.empty", "parse"))
    book.raw("json_list", b"[1, 2, 3]", Expect(invalid, "validate"))
    book.raw("json_string", b'"just a string"', Expect(invalid, "validate"))
    book.raw("id_not_a_string", json.dumps({"id": 5, "image": photo}).encode(), Expect(invalid, "validate", "id"))
    book.raw("missing_id", json.dumps({"image": photo}).encode(), Expect(invalid, "validate", "id: Field required"))
    book.raw("empty_id", json.dumps({"id": "", "image": photo}).encode(), Expect(invalid, "validate", "id"))
    book.raw("blank_id", json.dumps({"id": "   ", "image": photo}).encode(), Expect(invalid, "validate", "blank"))
    book.raw("unknown_field", json.dumps({"id": book.rid("x"), "image": photo, "colour": 1}).encode(),
             Expect(invalid, "validate", "colour"))
    both = {**photo, "base64": tiny}
    book.raw("both_sources", json.dumps({"id": book.rid("both"), "image": both}).encode(),
             Expect(invalid, "validate", "exactly one source"))
    book.raw("neither_source", json.dumps({"id": book.rid("neither"), "image": {}}).encode(),
             Expect(invalid, "validate", "exactly one source"))
    book.raw("bad_base64", json.dumps({"id": book.rid("b64"), "image": {"base64": "not*base64!"}}).encode(),
             Expect(invalid, "validate", "does not decode"))
    book.raw("file_url", json.dumps({"id": book.rid("file"), "image": {"url": "file:///etc/passwd"}}).encode(),
             Expect(invalid, "validate", "http"))
    # 10 MB: valid JSON around a (valid) base64 image far over the inline cap.
    huge = base64.b64encode(os.urandom(7_500_000)).decode("ascii")
    book.raw("ten_mb_message", json.dumps({"id": book.rid("huge"), "image": {"base64": huge}}).encode(),
             Expect("request.too_large", "parse"))
    # Each of these used to escape parse_request as a non-LabelstreamError and kill the worker.
    book.raw("deep_json", b"[" * 100_000 + b"]" * 100_000, Expect("request.too_deep", "parse"))
    deep = "[" * 200 + "]" * 200
    book.raw("deep_metadata", f'{{"id": "{book.rid("deep")}", "image": {json.dumps(photo)}, "metadata": {deep}}}'
             .encode(), Expect("request.too_deep", "parse"))
    book.raw("huge_integer", b'{"id": "x", "n": ' + b"9" * 5000 + b"}", Expect("request.invalid_json", "parse"))
    book.raw("lone_surrogate", b'{"id": "%s", "image": %s, "metadata": {"x": "\\udc00"}}'
             % (book.rid("surrogate").encode(), json.dumps(photo).encode()), Expect(invalid, "validate", "UTF-8"))


def s3_cases(book: CaseBook) -> None:
    b = book.buckets
    book.request("s3_missing_bucket", {"s3": {"bucket": b.missing, "key": "photo.jpg"}},
                 Expect("s3.bucket_not_found", "fetch"))
    book.request("s3_missing_key", {"s3": {"bucket": b.photos, "key": "no/such/key.jpg"}},
                 Expect("s3.not_found", "fetch"))
    book.request("s3_access_denied", {"s3": {"bucket": b.denied, "key": "photo.jpg"}},
                 Expect("s3.access_denied", "fetch"))
    book.request("s3_bucket_not_allowed", {"s3": {"bucket": b.outside, "key": "photo.jpg"}},
                 Expect("s3.bucket_not_allowed", "fetch"))
    book.s3_object("s3_zero_bytes", b"", Expect("image.empty", "fetch"))
    book.s3_object("s3_over_max_bytes", os.urandom(MAX_BYTES + 500_000), Expect("fetch.too_large", "fetch"))


def url_cases(book: CaseBook) -> None:
    port = book.web_port
    book.url("url_allowlisted_host", f"http://127.0.0.1:{port}/photo.jpg", LABEL)
    book.url("url_loopback_by_name", f"http://localhost:{port}/photo.jpg", Expect("url.forbidden_address", "fetch"))
    book.url("url_loopback_literal", f"http://127.0.0.2:{port}/photo.jpg", Expect("url.forbidden_address", "fetch"))
    book.url("url_cloud_metadata", "http://169.254.169.254/latest/meta-data/",
             Expect("url.forbidden_address", "fetch", "169.254.169.254"))
    book.url("url_redirect_to_metadata", f"http://127.0.0.1:{port}/to-metadata",
             Expect("url.forbidden_address", "fetch", "169.254.169.254"))
    book.url("url_redirect_to_localhost", f"http://127.0.0.1:{port}/to-localhost",
             Expect("url.forbidden_address", "fetch", "localhost"))
    book.url("url_redirect_to_private", f"http://127.0.0.1:{port}/to-private",
             Expect("url.forbidden_address", "fetch", "10.11.12.13"))


def image_cases(book: CaseBook, photo: Image.Image, other: Image.Image) -> None:
    book.s3_object("not_an_image", b"plain text, certainly not an image\n" * 20,
                   Expect("image.unsupported_format", "decode"))
    book.s3_object("truncated_jpeg", truncated(encode(noise(300, 200), "JPEG")), Expect("image.truncated", "decode"))
    book.inline("truncated_png", truncated(encode(noise(300, 200), "PNG")), Expect("image.truncated", "decode"))
    book.s3_object("png_bomb_30000x30000", png_declaring(30_000, 30_000), Expect("image.decompression_bomb", "decode"))
    book.s3_object("png_over_max_pixels", png_declaring(9_000, 8_000), Expect("image.too_large", "decode"))
    book.s3_object("bmp_not_allowed", encode(photo, "BMP"), Expect("image.format_not_allowed", "decode", "BMP"))
    book.inline("strip_1x20000", encode(Image.new("RGB", (1, 20_000), BLUE), "PNG"),
                Expect("image.extreme_aspect_ratio", "decode"))
    book.s3_object("cmyk_jpeg", cmyk_jpeg(photo), LABEL)
    book.s3_object("png_16_bit", sixteen_bit_png(), LABEL)
    book.s3_object("palette_png_transparency", palette_png_with_transparency(photo), LABEL)
    book.s3_object("grayscale_jpeg", encode(photo.convert("L"), "JPEG", quality=90), LABEL)
    book.s3_object("animated_gif", animated_gif(photo, other), LABEL)
    book.s3_object("exif_rotated_jpeg", exif_rotated_jpeg(photo), LABEL)
    book.inline("one_by_one", encode(Image.new("RGB", (1, 1), RED), "PNG"), LABEL)
    book.inline("big_inline_png", encode(noise(900, 900, seed=1), "PNG"), LABEL)


def good_cases(book: CaseBook, count: int, photos: list[Path]) -> list[Case]:
    for index in range(min(count, len(photos))):
        book.s3.put_object(Bucket=book.buckets.photos, Key=f"good/{index}.jpg", Body=photos[index].read_bytes())
    start = len(book.cases)
    for index in range(count):
        key = f"good/{index % len(photos)}.jpg"
        book.request(f"good_{index}", {"s3": {"bucket": book.buckets.photos, "key": key}}, LABEL)
    goods, book.cases = book.cases[start:], book.cases[:start]
    return goods


def interleave(hostile: list[Case], good: list[Case]) -> list[tuple[int, Case]]:
    """(partition, case): good, hostile, good, ... on each partition, a good one last on each."""
    placed: list[tuple[int, Case]] = []
    for index, case in enumerate(hostile):
        partition = index % PARTITIONS
        placed += [(partition, good[index]), (partition, case)]
    placed += [(p, good[len(hostile) + p]) for p in range(PARTITIONS)]
    return placed


# --- broker helpers ---------------------------------------------------------------


@dataclass(frozen=True)
class Produced:
    case: Case
    partition: int
    offset: int
    timestamp_ms: int


def produce(bootstrap: str, topic: str, placed: list[tuple[int, Case]]) -> list[Produced]:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_request_size=64 * 1024 * 1024)
    try:
        futures = [
            producer.send(topic, key=c.key, value=c.value, headers=c.headers, partition=p,
                          timestamp_ms=BASE_TIMESTAMP_MS + i)
            for i, (p, c) in enumerate(placed)
        ]
        producer.flush(timeout=60)
        metadata = [f.get(timeout=60) for f in futures]
    finally:
        producer.close()
    return [Produced(c, m.partition, m.offset, BASE_TIMESTAMP_MS + i)
            for i, ((_, c), m) in enumerate(zip(placed, metadata, strict=True))]


@dataclass
class Outputs:
    labels: list[ConsumerRecord] = field(default_factory=list)
    embeddings: list[ConsumerRecord] = field(default_factory=list)
    dead: list[ConsumerRecord] = field(default_factory=list)

    def terminal_count(self) -> int:
        return len(self.labels) + len(self.dead)


def read_outputs(bootstrap: str, topics: tuple[str, str, str], done: Callable[[Outputs], bool],
                 worker: WorkerProcess, timeout_s: float, idle_s: float = 2.0) -> Outputs:
    """Read until `done`, then on until nothing new comes for `idle_s` (so duplicates would show).

    Gives up at once if the worker dies: that is the failure these cases hunt for.
    """
    labels_topic, embeddings_topic, dlq_topic = topics
    reader = topic_reader(bootstrap, *topics)
    outputs = Outputs()
    by_topic = {labels_topic: outputs.labels, embeddings_topic: outputs.embeddings, dlq_topic: outputs.dead}
    deadline = time.monotonic() + timeout_s
    finished_at: float | None = None
    last_new = time.monotonic()
    try:
        while time.monotonic() < deadline:
            assert worker.proc.poll() is None, f"worker exited {worker.proc.returncode}:\n{worker.tail()}"
            for records in reader.poll(timeout_ms=200).values():
                for record in records:
                    by_topic[record.topic].append(record)
                last_new = time.monotonic()
            if finished_at is None and done(outputs):
                finished_at = time.monotonic()
            if finished_at is not None and time.monotonic() - last_new >= idle_s:
                break
    finally:
        reader.close()
    return outputs


# --- the worker subprocess (WorkerProcess, start_worker) lives in tests/worker_process.py ---


def write_taxonomy(folder: Path) -> Path:
    path = folder / "hostile-taxonomy.yaml"
    path.write_text(yaml.safe_dump({
        "name": "hostile", "top_k": TOP_K, "templates": ["a photo of a {}."], "classes": TAXONOMY_CLASSES,
    }))
    return path


@dataclass(frozen=True)
class Topics:
    requests: str
    labels: str
    embeddings: str
    dlq: str

    @property
    def outputs(self) -> tuple[str, str, str]:
        return (self.labels, self.embeddings, self.dlq)

    def env(self) -> dict[str, str]:
        return {
            "LABELSTREAM_TOPICS__REQUESTS": self.requests,
            "LABELSTREAM_TOPICS__LABELS": self.labels,
            "LABELSTREAM_TOPICS__EMBEDDINGS": self.embeddings,
            "LABELSTREAM_TOPICS__DLQ": self.dlq,
        }


def worker_settings_env(topics: Topics, group: str, s3_endpoint: str, taxonomy: Path) -> dict[str, str]:
    return {
        **topics.env(),
        "LABELSTREAM_KAFKA__GROUP_ID": group,
        "LABELSTREAM_S3__ENDPOINT_URL": s3_endpoint,
        "LABELSTREAM_TAXONOMY__PATH": str(taxonomy),
        "LABELSTREAM_TAXONOMY__FEED_ENABLED": "false",
        "LABELSTREAM_TAXONOMY__WATCH_INTERVAL_S": "0",
        # Most of this stream is poison on purpose: the breaker must not trip.
        "LABELSTREAM_DEAD_LETTER__MAX_CONSECUTIVE": "1000",
        "LABELSTREAM_DEAD_LETTER__MAX_RATIO": "1.0",
        "LABELSTREAM_DEAD_LETTER__HOLD_TIMEOUT_S": "1",
        "LABELSTREAM_FETCH__MAX_BYTES": str(MAX_BYTES),
        "LABELSTREAM_FETCH__MAX_INLINE_BYTES": str(MAX_INLINE_BYTES),
        "LABELSTREAM_FETCH__URL_TIMEOUT_S": "5",
        "LABELSTREAM_IMAGE__ALLOWED_FORMATS": json.dumps(ALLOWED_FORMATS),
        "LABELSTREAM_BATCH__MAX_WAIT_MS": "20",
    }


# --- assertions per case ---------------------------------------------------------------


def assert_dead_letter(record: ConsumerRecord, produced: Produced, expect: Expect, topic: str, group: str) -> None:
    case = produced.case
    headers = DeadLetterHeaders.from_kafka_headers(record.headers)
    assert (headers.error_code, headers.stage) == (expect.code, expect.stage), (case.name, headers)
    assert expect.message_part in headers.error_message, (case.name, headers.error_message)
    assert record.key == case.key, case.name
    assert record.value == case.value, case.name
    original = [(k, v) for k, v in record.headers if not k.startswith("labelstream_dlt-")]
    assert original == case.headers, case.name
    assert (headers.original_topic, headers.original_partition, headers.original_offset) == (
        topic, produced.partition, produced.offset), case.name
    assert headers.original_timestamp == produced.timestamp_ms, case.name
    assert headers.consumer_group == group, case.name
    assert headers.attempts == 1 and headers.retryable is False, (case.name, headers)
    assert headers.request_id == case.request_id, (case.name, headers.request_id)


def assert_label(document: dict[str, Any], produced: Produced, topic: str) -> None:
    record = LabelRecord.model_validate(document)
    case = produced.case
    assert record.metadata == {"case": case.name}
    assert record.source is not None
    assert (record.source.topic, record.source.partition, record.source.offset) == (
        topic, produced.partition, produced.offset), case.name
    assert len(record.labels) == TOP_K and {s.label for s in record.labels} <= set(TAXONOMY_CLASSES)


def where(produced: Produced) -> tuple[int, int]:
    return (produced.partition, produced.offset)


def check_every_input(outputs: Outputs, produced: list[Produced], topic: str, group: str) -> None:
    """Exactly one terminal output per input, and the right kind, with the right contents."""
    label_docs = [json.loads(r.value) for r in outputs.labels]
    labels_at: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for document in label_docs:
        source = document["source"]
        assert source["topic"] == topic
        labels_at.setdefault((source["partition"], source["offset"]), []).append(document)
    dead_at: dict[tuple[int, int], list[ConsumerRecord]] = {}
    for record in outputs.dead:
        headers = DeadLetterHeaders.from_kafka_headers(record.headers)
        dead_at.setdefault((headers.original_partition, headers.original_offset), []).append(record)
    known = {where(p) for p in produced}
    assert set(labels_at) | set(dead_at) <= known, "outputs for inputs that were never sent"
    problems = []
    for item in produced:
        got_labels, got_dead = labels_at.get(where(item), []), dead_at.get(where(item), [])
        if len(got_labels) + len(got_dead) != 1:
            problems.append(f"{item.case.name}: {len(got_labels)} labels, {len(got_dead)} dead letters "
                            f"{[DeadLetterHeaders.from_kafka_headers(r.headers).error_code for r in got_dead]}")
        elif item.case.expect == LABEL and not got_labels:
            code = DeadLetterHeaders.from_kafka_headers(got_dead[0].headers).error_code
            problems.append(f"{item.case.name}: expected a label, got dead letter {code}")
        elif isinstance(item.case.expect, Expect) and not got_dead:
            problems.append(f"{item.case.name}: expected {item.case.expect.code}, got a label")
    assert not problems, "\n".join(problems)
    for item in produced:
        if isinstance(item.case.expect, Expect):
            assert_dead_letter(dead_at[where(item)][0], item, item.case.expect, topic, group)
        else:
            assert_label(labels_at[where(item)][0], item, topic)
    check_embeddings(outputs, [p.case.request_id for p in produced if p.case.expect == LABEL])


def check_embeddings(outputs: Outputs, labelled_ids: list[str | None]) -> None:
    ids = sorted(json.loads(r.value)["id"] for r in outputs.embeddings)
    assert ids == sorted(i for i in labelled_ids if i is not None)
    for record in outputs.embeddings:
        vector = EmbeddingRecord.model_validate_json(record.value).to_vector()
        assert np.all(np.isfinite(vector))


# --- the expected labels, computed in this process -----------------------------------------


def in_process_labeler(tiny_model: Any, taxonomy: Path) -> Labeler:
    settings = Settings(
        model=ModelSettings(name=str(tiny_model.config_path), pretrained=str(tiny_model.checkpoint_path), device="cpu"),
        taxonomy=TaxonomySettings(path=taxonomy, feed_enabled=False, watch_interval_s=0),
    )
    return build_labeler(settings)


@dataclass(frozen=True)
class Scored:
    labels: list[tuple[str, float]]
    embedding: np.ndarray


def score_image(labeler: Labeler, image: Image.Image) -> Scored:
    prepared = labeler.prepare_bytes(encode(image, "PNG"))  # lossless: the very pixels given
    (result,) = labeler.label([prepared.pixels], [labeler.classifier_for(None)])
    return Scored([(name, float(score)) for name, score in result.labels], np.asarray(result.embedding))


def assert_scored_like(document: dict[str, Any], embedding: np.ndarray, expected: Scored, unlike: Scored) -> None:
    got = [(entry["label"], entry["score"]) for entry in document["labels"]]
    assert [name for name, _ in got] == [name for name, _ in expected.labels], (got, expected.labels)
    assert np.allclose([s for _, s in got], [s for _, s in expected.labels], atol=SCORE_TOLERANCE), got
    assert np.abs(embedding - expected.embedding).max() < SCORE_TOLERANCE
    # The check must be able to fail: the wrong orientation / frame scores differently.
    assert np.abs(unlike.embedding - expected.embedding).max() > 100 * SCORE_TOLERANCE


def check_scores_against_in_process(outputs: Outputs, produced: list[Produced], labeler: Labeler) -> None:
    by_name = {p.case.name: p for p in produced}
    labels = {json.loads(r.value)["id"]: json.loads(r.value) for r in outputs.labels}
    vectors = {r.key.decode(): EmbeddingRecord.model_validate_json(r.value).to_vector() for r in outputs.embeddings}

    exif = by_name["exif_rotated_jpeg"].case
    assert exif.image is not None
    sideways = stored_pixels(exif.image)
    upright = sideways.transpose(Image.Transpose.ROTATE_270)  # what orientation 6 means, done by hand
    assert exif.request_id is not None
    assert_scored_like(labels[exif.request_id], vectors[exif.request_id], score_image(labeler, upright),
                       unlike=score_image(labeler, sideways))

    gif = by_name["animated_gif"].case
    assert gif.request_id is not None and gif.image is not None
    with Image.open(io.BytesIO(gif.image)) as frames:
        first = frames.convert("RGB")
        frames.seek(1)
        second = frames.convert("RGB")
    assert_scored_like(labels[gif.request_id], vectors[gif.request_id], score_image(labeler, first),
                       unlike=score_image(labeler, second))


# --- the run ------------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_every_hostile_input_gets_exactly_one_specific_terminal_output_and_the_worker_survives(
    broker: Any,
    strict_s3: EmbeddedS3,
    new_topic: Callable[..., str],
    unique_id: str,
    worker_env: Callable[..., dict[str, str]],
    sample_photos: list[Path],
    tiny_model: Any,
    web: WebServer,
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    taxonomy = write_taxonomy(tmp_path)
    photo_bytes = sample_photos[0].read_bytes()
    buckets = make_buckets(strict_s3.endpoint_url, unique_id, photo_bytes)
    s3 = s3_client_for(strict_s3.endpoint_url)

    main = Topics(new_topic(PARTITIONS), new_topic(1), new_topic(1), new_topic(1))
    off = Topics(new_topic(1), new_topic(1), new_topic(1), new_topic(1))
    group, off_group = f"hostile-{unique_id}", f"hostile-url-off-{unique_id}"

    # Start both workers first: they load the model and join while the cases are built.
    base = worker_settings_env(main, group, strict_s3.endpoint_url, taxonomy)
    env = worker_env(**base, LABELSTREAM_S3__ALLOWED_BUCKETS=json.dumps(buckets.allowed),
                     LABELSTREAM_FETCH__URL_ENABLED="true", LABELSTREAM_FETCH__URL_ALLOWED_HOSTS='["127.0.0.1"]')
    off_env = worker_env(**worker_settings_env(off, off_group, strict_s3.endpoint_url, taxonomy),
                         LABELSTREAM_FETCH__URL_ALLOWED_HOSTS='["127.0.0.1"]')
    worker, off_worker = start_worker(env, tmp_path, "hostile"), start_worker(off_env, tmp_path, "url-off")
    try:
        book = CaseBook(unique_id, s3, buckets, web.port)
        photo = Image.open(sample_photos[0]).convert("RGB").resize((160, 100))
        other = Image.open(sample_photos[1]).convert("RGB").resize((160, 100))
        request_cases(book)
        s3_cases(book)
        url_cases(book)
        image_cases(book, photo, other)
        hostile = list(book.cases)
        goods = good_cases(book, len(hostile) + PARTITIONS, sample_photos[:6])
        produced = produce(broker.bootstrap, main.requests, interleave(hostile, goods))

        off_book = CaseBook(unique_id, s3, buckets, web.port)
        off_book.url("url_sources_off", f"http://127.0.0.1:{web.port}/photo-never-fetched.jpg",
                     Expect("url.disabled", "fetch"))
        off_book.inline("url_off_worker_still_labels", encode(photo, "PNG"), LABEL)
        off_produced = produce(broker.bootstrap, off.requests, [(0, c) for c in off_book.cases])

        outputs = read_outputs(broker.bootstrap, main.outputs,
                               lambda o: o.terminal_count() >= len(produced) and len(o.embeddings) >= len(o.labels),
                               worker, OUTPUTS_TIMEOUT_S)
        wait_for_commits(broker.bootstrap, group, true_end_offsets(main.requests, produced), 30, exact=True)
        off_outputs = read_outputs(broker.bootstrap, off.outputs, lambda o: o.terminal_count() >= 2,
                                   off_worker, 30)
        wait_for_commits(broker.bootstrap, off_group, true_end_offsets(off.requests, off_produced), 30, exact=True)

        assert worker.proc.poll() is None, f"worker died:\n{worker.tail()}"
        assert off_worker.proc.poll() is None, f"url-off worker died:\n{off_worker.tail()}"
        assert worker.stop() == 0, worker.tail()
        assert off_worker.stop() == 0, off_worker.tail()
    finally:
        worker.kill()
        off_worker.kill()

    check_every_input(outputs, produced, main.requests, group)
    check_every_input(off_outputs, off_produced, off.requests, off_group)
    assert committed_offsets(broker.bootstrap, group) == true_end_offsets(main.requests, produced)
    assert not [e for e in worker.events("dead_lettered") if e.get("code") == "internal.unexpected"]
    assert len(worker.events("dead_lettered")) == len(outputs.dead)
    # Refused URLs were refused before connecting: nothing reached the server under another name.
    assert {host for host, _ in web.seen} == {f"127.0.0.1:{web.port}"}, web.seen
    assert "/photo-never-fetched.jpg" not in {path for _, path in web.seen}
    check_scores_against_in_process(outputs, produced, in_process_labeler(tiny_model, taxonomy))
    print(f"\nhostile run: {len(produced)} inputs, {len(outputs.dead)} dead letters, "
          f"{len(outputs.labels)} labels, {time.monotonic() - started:.1f}s")


@pytest.mark.timeout(120)
def test_a_record_too_big_to_dead_letter_verbatim_still_ends_in_one_dead_letter(
    broker: Any,
    strict_s3: EmbeddedS3,
    new_topic: Callable[..., str],
    unique_id: str,
    worker_env: Callable[..., dict[str, str]],
    sample_photos: list[Path],
    tmp_path: Path,
) -> None:
    """A record over the worker's own producer limit (16 MiB) must not become a poison pill.

    Tansu (like a Kafka topic with a raised max.message.bytes) accepts it, so
    the worker reads it and must dead-letter it; it may have to leave the
    value out of the dead letter, but it must neither crash nor stall.
    """
    taxonomy = write_taxonomy(tmp_path)
    buckets = make_buckets(strict_s3.endpoint_url, unique_id, sample_photos[0].read_bytes())
    book = CaseBook(unique_id, s3_client_for(strict_s3.endpoint_url), buckets, web_port=0)
    goods = good_cases(book, 2, sample_photos[:1])
    huge = base64.b64encode(os.urandom(15 * 1024 * 1024)).decode("ascii")  # a 20 MiB record
    book.raw("twenty_mb_message", json.dumps({"id": book.rid("huge"), "image": {"base64": huge}}).encode(),
             Expect("request.too_large", "parse"))
    topics = Topics(new_topic(1), new_topic(1), new_topic(1), new_topic(1))
    group = f"hostile-huge-{unique_id}"
    env = worker_env(**worker_settings_env(topics, group, strict_s3.endpoint_url, taxonomy),
                     LABELSTREAM_S3__ALLOWED_BUCKETS=json.dumps(buckets.allowed))
    worker = start_worker(env, tmp_path, "huge")
    try:
        produced = produce(broker.bootstrap, topics.requests, [(0, goods[0]), (0, book.cases[0]), (0, goods[1])])
        outputs = read_outputs(broker.bootstrap, topics.outputs, lambda o: o.terminal_count() >= 3, worker, 60)
        wait_for_commits(broker.bootstrap, group, true_end_offsets(topics.requests, produced), 30, exact=True)
        assert worker.stop() == 0, worker.tail()
    finally:
        worker.kill()
    assert len(outputs.labels) == 2 and len(outputs.dead) == 1, outputs
    (dead,) = outputs.dead
    headers = DeadLetterHeaders.from_kafka_headers(dead.headers)
    assert (headers.error_code, headers.stage, headers.original_offset) == ("request.too_large", "parse", 1)
    assert dead.key == book.cases[0].key
    assert [(k, v) for k, v in dead.headers if not k.startswith("labelstream_dlt-")] == book.cases[0].headers


# --- the product guards behind some cases, in process ----------------------------------------


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (b"[" * 100_000, "request.too_deep"),
        (b'{"id": "a", "metadata": ' + b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1) + b"}",
         "request.too_deep"),
        (b"1" * 5000, "request.invalid_json"),
        (b'{"id": "a", "image": {"base64": "QUJD"}, "metadata": {"x": "\\ud800"}}', "request.invalid"),
        (b" " * (max_request_bytes(1000) + 1), "request.too_large"),
    ],
    ids=["deep-json", "deep-metadata", "huge-integer", "lone-surrogate", "over-size"],
)
def test_parse_request_turns_every_crash_into_a_request_error(value: bytes, code: str) -> None:
    with pytest.raises(RequestError) as caught:
        parse_request(value, max_inline_bytes=1000)
    assert caught.value.code == code
    caught.value.message.encode("utf-8")  # it ends up in a header


def test_parse_request_still_takes_reasonable_nesting_and_size() -> None:
    nested = "[" * (MAX_JSON_DEPTH - 3) + "]" * (MAX_JSON_DEPTH - 3)
    payload = base64.b64encode(b"\x00" * 990).decode()
    value = f'{{"id": "a", "image": {{"base64": "{payload}"}}, "metadata": {{"x": {nested}}}}}'.encode()
    assert parse_request(value, max_inline_bytes=1000).id == "a"


def test_extreme_aspect_ratio_is_refused_before_preprocessing_could_blow_up() -> None:
    strip = encode(Image.new("RGB", (1, MAX_ASPECT_RATIO + 1), RED), "PNG")
    with pytest.raises(ImageError) as caught:
        decode_image(strip, ImageSettings())
    assert caught.value.code == "image.extreme_aspect_ratio"
    assert decode_image(encode(Image.new("RGB", (1, MAX_ASPECT_RATIO), RED), "PNG"), ImageSettings()).size == (
        1, MAX_ASPECT_RATIO)
