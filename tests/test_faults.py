"""Faults against real processes: crashes, a frozen broker, S3 going away, poison, stops, rebalances.

Every test runs real `labelstream run` subprocesses with the tiny model
against the session's Tansu broker and moto S3 server, injects a real fault
(SIGKILL, SIGSTOP of the broker, stopping the S3 server, SIGTERM, a new group
member), and then reads the outputs and the committed offsets back over the
Kafka protocol. Nothing in the worker is mocked or patched.

What "lost" means here: an input id with neither a label and an embedding nor
a dead letter once the workers have caught up and committed the true end of
every partition (computed from the producer's RecordMetadata; Tansu's
`end_offsets()` is wrong for multi-record batches).
"""

from __future__ import annotations

import base64
import io
import json
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from kafka import KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from PIL import Image
from worker_process import (
    OutputCollector,
    Produced,
    WorkerProcess,
    committed_offsets,
    produce,
    start_worker,
    true_end_offsets,
    wait_for_commits,
)

from schemas.deadletter import DeadLetterHeaders

MAX_IN_FLIGHT = 64
START_TIMEOUT_S = 90.0
CATCH_UP_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
IMAGE_SIDE = 64
TAXONOMY = {"name": "faults", "templates": ["a photo of a {}."], "classes": ["dog", "cat", "flower", "textile"]}


# -- the system under test: topics, a bucket, worker settings ----------------------------------


@dataclass
class Pipeline:
    """Topics, group and settings shared by the workers of one test."""

    bootstrap: str
    requests: str
    labels: str
    embeddings: str
    dlq: str
    group: str
    env: dict[str, str]
    log_dir: Path
    workers: list[WorkerProcess] = field(default_factory=list)

    def start(self, name: str, **overrides: str) -> WorkerProcess:
        worker = start_worker({**self.env, **overrides}, self.log_dir, name)
        self.workers.append(worker)
        return worker

    def kill_all(self) -> None:
        for worker in self.workers:
            worker.kill()

    def outputs(self, read_committed: bool = False) -> OutputCollector:
        return OutputCollector(self.bootstrap, self.labels, self.embeddings, self.dlq, read_committed=read_committed)


@pytest.fixture
def pipeline(
    broker: Any, new_topic: Callable[..., str], unique_id: str, worker_env: Callable[..., dict[str, str]],
    tmp_path: Path,
) -> Iterator[Callable[..., Pipeline]]:
    """A factory: `pipeline(partitions, **env)`; every worker it starts is killed at the end."""
    made: list[Pipeline] = []
    taxonomy = tmp_path / "taxonomy.yaml"
    taxonomy.write_text(yaml.safe_dump(TAXONOMY))

    def build(partitions: int = 4, **overrides: str) -> Pipeline:
        requests, labels, embeddings, dlq = new_topic(partitions), new_topic(2), new_topic(2), new_topic(1)
        group = f"faults-{unique_id}"
        env = worker_env(
            LABELSTREAM_TOPICS__REQUESTS=requests,
            LABELSTREAM_TOPICS__LABELS=labels,
            LABELSTREAM_TOPICS__EMBEDDINGS=embeddings,
            LABELSTREAM_TOPICS__DLQ=dlq,
            LABELSTREAM_KAFKA__GROUP_ID=group,
            LABELSTREAM_TAXONOMY__PATH=str(taxonomy),
            # Taxonomy hot reload is tested elsewhere; here it would only add a consumer per worker.
            LABELSTREAM_TAXONOMY__FEED_ENABLED="false",
            LABELSTREAM_TAXONOMY__WATCH_INTERVAL_S="0",
            LABELSTREAM_WORKER__MAX_IN_FLIGHT=str(MAX_IN_FLIGHT),
            LABELSTREAM_WORKER__COMMIT_INTERVAL_MS="50",
            LABELSTREAM_RETRY__MAX_BACKOFF_MS="1000",
            **overrides,
        )
        made.append(Pipeline(broker.bootstrap, requests, labels, embeddings, dlq, group, env, tmp_path))
        return made[-1]

    yield build
    for built in made:
        built.kill_all()


# -- requests -------------------------------------------------------------------------------


def small_jpeg_base64(photo: Path) -> str:
    with Image.open(photo) as image:
        image = image.convert("RGB")
        image.thumbnail((IMAGE_SIDE, IMAGE_SIDE))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def upload_small_photos(s3_client: Any, bucket: str, photos: list[Path]) -> list[str]:
    keys = []
    for i, photo in enumerate(photos):
        key = f"photos/{i}-{photo.name}"
        s3_client.put_object(Bucket=bucket, Key=key, Body=base64.b64decode(small_jpeg_base64(photo)))
        keys.append(key)
    return keys


def inline_request(request_id: str, image_b64: str) -> bytes:
    return json.dumps({"id": request_id, "image": {"base64": image_b64}}).encode()


def s3_request(request_id: str, bucket: str, key: str) -> bytes:
    return json.dumps({"id": request_id, "image": {"s3": {"bucket": bucket, "key": key}}}).encode()


def poison_values(bucket: str) -> list[bytes]:
    """Each is dead-lettered at a different stage: parse, validate, fetch, decode."""
    not_an_image = base64.b64encode(b"definitely not an image").decode()
    return [
        b"{not json",
        json.dumps({"id": "", "image": {}}).encode(),
        s3_request("missing-key", bucket, "photos/no-such-key.jpg"),
        json.dumps({"id": "not-an-image", "image": {"base64": not_an_image}}).encode(),
    ]


@dataclass
class Stream:
    """The requests of one test: key -> value, and which keys should end as dead letters."""

    messages: list[tuple[int, bytes, bytes]]
    good: set[str]
    bad: set[str]

    @property
    def keys(self) -> set[str]:
        return self.good | self.bad


def mixed_stream(count: int, partitions: int, images: list[str], bad_every: int, bucket: str,
                 s3_keys: list[str], s3_every: int = 10) -> Stream:
    """Good requests (mostly inline, every `s3_every`-th from S3) with a poison one every `bad_every`."""
    poison = poison_values(bucket)
    messages, good, bad = [], set(), set()
    for i in range(count):
        key = f"r{i:05d}"
        if bad_every and i % bad_every == bad_every - 1:
            value = poison[(i // bad_every) % len(poison)]
            bad.add(key)
        elif s3_keys and i % s3_every == 0:
            value = s3_request(key, bucket, s3_keys[i % len(s3_keys)])
            good.add(key)
        else:
            value = inline_request(key, images[i % len(images)])
            good.add(key)
        messages.append((i % partitions, key.encode(), value))
    return Stream(messages, good, bad)


class PacedProducer:
    """Produces a stream in the background at a steady rate, so faults land mid-stream."""

    def __init__(self, bootstrap: str, topic: str, messages: list[tuple[int, bytes, bytes]], duration_s: float):
        self.topic = topic
        self.produced: list[Produced] = []
        self.error: BaseException | None = None
        self._bootstrap = bootstrap
        self._messages = messages
        self._duration_s = duration_s
        self._thread = threading.Thread(target=self._run, name="paced-producer", daemon=True)

    def start(self) -> PacedProducer:
        self._thread.start()
        return self

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self, timeout_s: float) -> list[Produced]:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the producer did not finish"
        assert self.error is None, f"producing failed: {self.error!r}"
        assert len(self.produced) == len(self._messages)
        return self.produced

    def _run(self) -> None:
        producer = KafkaProducer(bootstrap_servers=self._bootstrap, acks="all", linger_ms=5)
        chunk = max(1, len(self._messages) // max(1, int(self._duration_s * 5)))
        started = time.monotonic()
        try:
            for begin in range(0, len(self._messages), chunk):
                futures = [producer.send(self.topic, key=k, value=v, partition=p)
                           for p, k, v in self._messages[begin:begin + chunk]]
                self.produced += [Produced(m.partition, m.offset) for m in (f.get(timeout=60) for f in futures)]
                due = started + self._duration_s * (begin + chunk) / len(self._messages)
                time.sleep(max(0.0, due - time.monotonic()))
        except BaseException as exc:  # noqa: BLE001 - reported by join()
            self.error = exc
        finally:
            producer.close(timeout=10)


# -- reading outcomes back -------------------------------------------------------------------


@dataclass
class Outcomes:
    """Output records grouped by the input key they answer."""

    labels: Counter[str]
    embeddings: Counter[str]
    dead_letters: Counter[str]
    # (partition, offset) of every input that has an output.
    answered: set[tuple[int, int]]

    @property
    def finished(self) -> set[str]:
        labelled = {k for k in self.labels if self.embeddings[k]}
        return labelled | set(self.dead_letters)


def outcomes_of(pipeline: Pipeline, records: list[ConsumerRecord]) -> Outcomes:
    labels, embeddings, dead = Counter(), Counter(), Counter()
    answered: set[tuple[int, int]] = set()
    for record in records:
        key = record.key.decode() if record.key is not None else ""
        if record.topic == pipeline.labels:
            labels[key] += 1
            source = json.loads(record.value)["source"]
            answered.add((source["partition"], source["offset"]))
        elif record.topic == pipeline.embeddings:
            embeddings[key] += 1
        elif record.topic == pipeline.dlq:
            dead[key] += 1
            headers = DeadLetterHeaders.from_kafka_headers(record.headers)
            answered.add((headers.original_partition, headers.original_offset))
    return Outcomes(labels, embeddings, dead, answered)


def wait_until_finished(pipeline: Pipeline, collector: OutputCollector, stream: Stream, timeout_s: float,
                        alive: Callable[[], None] = lambda: None) -> Outcomes:
    collector.read_until(lambda records: stream.keys <= outcomes_of(pipeline, records).finished, timeout_s, alive)
    return outcomes_of(pipeline, collector.records)


def assert_nothing_lost(stream: Stream, outcomes: Outcomes) -> None:
    lost = sorted(stream.keys - outcomes.finished)
    assert not lost, f"{len(lost)} inputs lost, e.g. {lost[:5]}"
    assert set(outcomes.labels) == stream.good, f"labelled: {sorted(set(outcomes.labels) ^ stream.good)[:5]}"
    assert set(outcomes.embeddings) == stream.good
    assert set(outcomes.dead_letters) == stream.bad


def assert_commits_only_answered_inputs(
    pipeline: Pipeline, produced: list[Produced], committed: dict[TopicPartition, int], outcomes: Outcomes
) -> None:
    """Per partition: every input below the committed offset has an output, and none at or above it has.

    The second half holds whenever the worker stopped cleanly: everything it
    published it also committed.
    """
    for item in produced:
        position = committed.get(TopicPartition(pipeline.requests, item.partition), 0)
        has_output = (item.partition, item.offset) in outcomes.answered
        assert has_output == (item.offset < position), (
            f"partition {item.partition} offset {item.offset}: output={has_output}, committed up to {position}"
        )


def assert_committed_inputs_answered(
    pipeline: Pipeline, produced: list[Produced], committed: dict[TopicPartition, int], outcomes: Outcomes
) -> None:
    """Every input below the committed offset has an output: no commit of unacknowledged work."""
    unanswered = [
        (item.partition, item.offset) for item in produced
        if item.offset < committed.get(TopicPartition(pipeline.requests, item.partition), 0)
        and (item.partition, item.offset) not in outcomes.answered
    ]
    assert not unanswered, f"committed without outputs: {unanswered[:5]}"


class CommitAuditor:
    """Samples the group's committed offsets while faults happen, to check them against outputs later.

    Outputs are acknowledged before their offsets are committed, so every
    input below a sampled committed offset must already have its outputs.
    """

    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline
        self.samples: list[dict[TopicPartition, int]] = []

    def sample(self) -> None:
        self.samples.append(committed_offsets(self._pipeline.bootstrap, self._pipeline.group))

    def check(self, produced: list[Produced], outcomes: Outcomes) -> None:
        assert self.samples, "no commits were sampled"
        for committed in self.samples:
            assert_committed_inputs_answered(self._pipeline, produced, committed, outcomes)


def labelled_count(worker: WorkerProcess) -> int:
    return len(worker.events("labelled"))


def clean_stop(worker: WorkerProcess) -> None:
    code = worker.stop(STOP_TIMEOUT_S)
    assert code == 0, f"{worker.name} exited {code}:\n{worker.tail()}"


# -- a TCP gate in front of S3 -----------------------------------------------------------------


class S3Gate:
    """A TCP forwarder on its own port that the worker reaches S3 through.

    Closed, it stops listening (connections are refused, like a server that
    is down) and cuts the connections it carries. It exists because moto
    forgets every bucket when it restarts while real S3 does not: the test
    puts the bucket back before opening the gate, so the worker never meets
    that artefact of the test double. With `delay_s` it holds every request
    that long before passing it on: a slow S3.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.delay_s = 0.0
        self._listener: socket.socket | None = None
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            _shut(conn)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                _shut(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                self._connections += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, is_request: bool) -> None:
        try:
            while data := source.recv(65536):
                if is_request and self.delay_s:
                    time.sleep(self.delay_s)
                target.sendall(data)
        except OSError:
            pass
        _shut(source)
        _shut(target)


def _shut(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    conn.close()


@pytest.fixture
def s3_gate(s3_server: Any) -> Iterator[S3Gate]:
    gate = S3Gate(s3_server.port)
    gate.open()
    yield gate
    gate.close()


# -- crash: SIGKILL workers mid-stream ---------------------------------------------------------

CRASH_REQUESTS = 2000
CRASH_PARTITIONS = 4
CRASH_KILLS = 5
CRASH_MAX_KILLS = 7
CRASH_STREAM_S = 60.0
# Seconds between kills: a restarted worker needs a few to load the model and rejoin.
CRASH_INTERVAL_S = (2.0, 4.0)
BAD_EVERY = 97


def run_crash_scenario(pipeline: Pipeline, stream: Stream, transactional: bool, seed: int) -> tuple[int, Outcomes]:
    """Two workers, one killed at random >= CRASH_KILLS times mid-stream; returns (kills, outcomes)."""
    rng = random.Random(seed)

    def start(slot: int, generation: int) -> WorkerProcess:
        # The same logical worker keeps its transactional id across restarts, so it fences its own past.
        extra = {"LABELSTREAM_KAFKA__TRANSACTIONAL_ID": f"{pipeline.group}-w{slot}"} if transactional else {}
        return pipeline.start(f"w{slot}-gen{generation}", **extra)

    slots = [start(0, 0), start(1, 0)]
    collector = pipeline.outputs(read_committed=transactional)
    auditor = CommitAuditor(pipeline)
    producer = PacedProducer(pipeline.bootstrap, pipeline.requests, stream.messages, CRASH_STREAM_S).start()
    kills = 0
    try:
        while kills < CRASH_KILLS or (kills < CRASH_MAX_KILLS and not producer.done):
            victim = _pick_busy_worker(slots, rng, collector)
            if victim is None:
                break
            assert not producer.done, f"the stream ended before kill {kills + 1}"
            slots[victim].kill()
            kills += 1
            slots[victim] = start(victim, kills)
            auditor.sample()
            _pause_reading(collector, rng.uniform(*CRASH_INTERVAL_S))
        produced = producer.join(60)
        ends = true_end_offsets(pipeline.requests, produced)
        wait_for_commits(pipeline.bootstrap, pipeline.group, ends, CATCH_UP_TIMEOUT_S)
        outcomes = wait_until_finished(pipeline, collector, stream, 30)
        collector.read_until_idle()
        for worker in slots:
            clean_stop(worker)
        outcomes = outcomes_of(pipeline, collector.records)
        auditor.check(produced, outcomes)
        return kills, outcomes
    finally:
        collector.close()


def _pick_busy_worker(slots: list[WorkerProcess], rng: random.Random, collector: OutputCollector) -> int | None:
    """A random worker that is labelling right now (it holds partitions), waiting up to a minute for one."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for worker in slots:
            worker.assert_alive()
        busy = [i for i, worker in enumerate(slots) if labelled_count(worker) > 0]
        if busy:
            return rng.choice(busy)
        collector.poll()
    return None


def _pause_reading(collector: OutputCollector, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        collector.poll(timeout_ms=100)


@pytest.mark.timeout(300)
def test_sigkill_mid_stream_at_least_once_loses_nothing_and_bounds_duplicates(
    pipeline: Callable[..., Pipeline], s3_client: Any, new_bucket: Callable[[], str], sample_photos: list[Path],
) -> None:
    system = pipeline(CRASH_PARTITIONS)
    bucket = new_bucket()
    keys = upload_small_photos(s3_client, bucket, sample_photos[:4])
    images = [small_jpeg_base64(p) for p in sample_photos[:8]]
    stream = mixed_stream(CRASH_REQUESTS, CRASH_PARTITIONS, images, BAD_EVERY, bucket, keys)

    kills, outcomes = run_crash_scenario(system, stream, transactional=False, seed=1)

    assert_nothing_lost(stream, outcomes)
    duplicates = sum(outcomes.labels.values()) - len(outcomes.labels)
    assert duplicates <= kills * MAX_IN_FLIGHT, f"{duplicates} duplicate labels after {kills} kills"
    assert sum(outcomes.embeddings.values()) - len(outcomes.embeddings) <= kills * MAX_IN_FLIGHT


@pytest.mark.timeout(300)
def test_sigkill_mid_stream_exactly_once_read_committed_sees_each_id_once(
    pipeline: Callable[..., Pipeline], s3_client: Any, new_bucket: Callable[[], str], sample_photos: list[Path],
) -> None:
    system = pipeline(CRASH_PARTITIONS, LABELSTREAM_DELIVERY="exactly_once")
    bucket = new_bucket()
    keys = upload_small_photos(s3_client, bucket, sample_photos[:4])
    images = [small_jpeg_base64(p) for p in sample_photos[:8]]
    stream = mixed_stream(CRASH_REQUESTS, CRASH_PARTITIONS, images, BAD_EVERY, bucket, keys)

    kills, outcomes = run_crash_scenario(system, stream, transactional=True, seed=2)

    assert kills >= CRASH_KILLS
    assert_nothing_lost(stream, outcomes)
    twice = [key for counts in (outcomes.labels, outcomes.embeddings, outcomes.dead_letters)
             for key, n in counts.items() if n != 1]
    assert not twice, f"{len(twice)} ids seen more than once by a read_committed reader, e.g. {twice[:5]}"
