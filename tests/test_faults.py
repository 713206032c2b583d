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
import signal
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
            # Two workers on one host would fight over the default metrics port.
            LABELSTREAM_METRICS__PORT="0",
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
    """Produces a stream in the background at a steady rate, so faults land mid-stream.

    `hold()` stops it between two acknowledged chunks, for faults of the
    broker itself: a request caught by the outage could be written twice
    by the test's own producer, and the expected end offsets would be off.
    """

    def __init__(self, bootstrap: str, topic: str, messages: list[tuple[int, bytes, bytes]], duration_s: float):
        self.topic = topic
        self.produced: list[Produced] = []
        self.error: BaseException | None = None
        self._bootstrap = bootstrap
        self._messages = messages
        self._duration_s = duration_s
        self._thread = threading.Thread(target=self._run, name="paced-producer", daemon=True)
        self._may_send = threading.Event()
        self._may_send.set()
        self._idle = threading.Event()

    def start(self) -> PacedProducer:
        self._thread.start()
        return self

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def hold(self, timeout_s: float = 60.0) -> None:
        self._idle.clear()
        self._may_send.clear()
        if not self.done:
            assert self._idle.wait(timeout_s), "the producer did not pause"

    def release(self) -> None:
        self._may_send.set()

    def join(self, timeout_s: float) -> list[Produced]:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the producer did not finish"
        assert self.error is None, f"producing failed: {self.error!r}"
        assert len(self.produced) == len(self._messages)
        return self.produced

    def _run(self) -> None:
        producer = KafkaProducer(bootstrap_servers=self._bootstrap, acks="all", linger_ms=5)
        chunk = max(1, len(self._messages) // max(1, int(self._duration_s * 5)))
        interval_s = self._duration_s * chunk / len(self._messages)
        try:
            for begin in range(0, len(self._messages), chunk):
                self._wait_until_allowed()
                futures = [producer.send(self.topic, key=k, value=v, partition=p)
                           for p, k, v in self._messages[begin:begin + chunk]]
                self.produced += [Produced(m.partition, m.offset) for m in (f.get(timeout=60) for f in futures)]
                time.sleep(interval_s)
        except BaseException as exc:  # noqa: BLE001 - reported by join()
            self.error = exc
        finally:
            self._idle.set()
            producer.close(timeout=10)

    def _wait_until_allowed(self) -> None:
        if not self._may_send.is_set():
            self._idle.set()
            self._may_send.wait()


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


def assert_abandoned_work_uncommitted(pipeline: Pipeline, produced: list[Produced], outcomes: Outcomes) -> None:
    """After a stop that abandoned work: inputs without outputs exist, and none is below a committed offset.

    (Finished inputs above an abandoned one may have outputs and stay
    uncommitted: the next owner repeats them, at-least-once.)
    """
    committed = committed_offsets(pipeline.bootstrap, pipeline.group)
    assert_committed_inputs_answered(pipeline, produced, committed, outcomes)
    unanswered = [p for p in produced if (p.partition, p.offset) not in outcomes.answered]
    assert unanswered, "nothing was abandoned"


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


@dataclass
class CrashResult:
    killed: list[WorkerProcess]
    outcomes: Outcomes
    produced: list[Produced]
    # The group's committed offsets, sampled right after each kill.
    committed_at_kills: list[dict[TopicPartition, int]]

    @property
    def kills(self) -> int:
        return len(self.killed)


def run_crash_scenario(pipeline: Pipeline, stream: Stream, transactional: bool, seed: int) -> CrashResult:
    """Two workers, one killed at random >= CRASH_KILLS times mid-stream and restarted each time."""
    rng = random.Random(seed)

    def start(slot: int, generation: int) -> WorkerProcess:
        # The same logical worker keeps its transactional id across restarts, so it fences its own past.
        extra = {"LABELSTREAM_KAFKA__TRANSACTIONAL_ID": f"{pipeline.group}-w{slot}"} if transactional else {}
        return pipeline.start(f"w{slot}-gen{generation}", **extra)

    slots = [start(0, 0), start(1, 0)]
    collector = pipeline.outputs(read_committed=transactional)
    auditor = CommitAuditor(pipeline)
    producer = PacedProducer(pipeline.bootstrap, pipeline.requests, stream.messages, CRASH_STREAM_S).start()
    killed: list[WorkerProcess] = []
    try:
        while len(killed) < CRASH_KILLS or (len(killed) < CRASH_MAX_KILLS and not producer.done):
            victim = _pick_busy_worker(slots, rng, collector)
            assert victim is not None, "no worker got busy within a minute"
            assert not producer.done, f"the stream ended before kill {len(killed) + 1}"
            slots[victim].kill()
            killed.append(slots[victim])
            slots[victim] = start(victim, len(killed))
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
        return CrashResult(killed, outcomes, produced, auditor.samples)
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
    stream = crash_stream(s3_client, new_bucket(), sample_photos)

    result = run_crash_scenario(system, stream, transactional=False, seed=1)

    assert_nothing_lost(stream, result.outcomes)
    bound = result.kills * MAX_IN_FLIGHT
    for counts in (result.outcomes.labels, result.outcomes.embeddings, result.outcomes.dead_letters):
        duplicates = sum(counts.values()) - len(counts)
        assert duplicates <= bound, f"{duplicates} duplicates after {result.kills} kills (bound {bound})"


@pytest.mark.timeout(300)
def test_sigkill_mid_stream_exactly_once_read_committed_sees_each_id_once(
    pipeline: Callable[..., Pipeline], s3_client: Any, new_bucket: Callable[[], str], sample_photos: list[Path],
) -> None:
    system = pipeline(CRASH_PARTITIONS, LABELSTREAM_DELIVERY="exactly_once")
    stream = crash_stream(s3_client, new_bucket(), sample_photos)

    result = run_crash_scenario(system, stream, transactional=True, seed=2)

    assert_nothing_lost(stream, result.outcomes)
    repeated = sorted(
        key for counts in (result.outcomes.labels, result.outcomes.embeddings, result.outcomes.dead_letters)
        for key, n in counts.items() if n > 1
    )
    # Anything repeated must come from the open transaction of a worker at the moment it was killed.
    key_at = {(where.partition, where.offset): key.decode()
              for where, (_, key, _) in zip(result.produced, stream.messages, strict=True)}
    explained = published_just_before_death(result.killed) | uncommitted_at_a_kill(system, result)
    unexplained = set(repeated) - {key_at[where] for where in explained}
    assert not unexplained, f"{len(unexplained)} ids repeated that no killed worker had in flight: {sorted(unexplained)[:5]}"
    if repeated:
        pytest.xfail(
            f"{len(set(repeated))} ids from the open transactions of killed workers became visible to "
            "read_committed: Tansu 0.6.0 does not abort a fenced producer's open transaction "
            "(see test_broker_aborts_the_open_transaction_of_a_fenced_producer)"
        )


def inline_stream(sample_photos: list[Path], requests: int, partitions: int) -> Stream:
    """Base64 images only (no S3), with a poison message every BAD_EVERY."""
    images = [small_jpeg_base64(p) for p in sample_photos[:8]]
    return mixed_stream(requests, partitions, images, BAD_EVERY, "unused-bucket", [])


def crash_stream(s3_client: Any, bucket: str, sample_photos: list[Path]) -> Stream:
    keys = upload_small_photos(s3_client, bucket, sample_photos[:4])
    images = [small_jpeg_base64(p) for p in sample_photos[:8]]
    return mixed_stream(CRASH_REQUESTS, CRASH_PARTITIONS, images, BAD_EVERY, bucket, keys)


def uncommitted_at_a_kill(pipeline: Pipeline, result: CrashResult) -> set[tuple[int, int]]:
    """Inputs a killed worker may have had in its open transaction: read but not committed when it died.

    Such a worker logs nothing for them (it logs after the commit), so the
    log alone cannot name them; the committed offsets sampled at the kill can.
    A worker holds at most MAX_IN_FLIGHT uncommitted inputs.
    """
    inputs: set[tuple[int, int]] = set()
    for committed in result.committed_at_kills:
        for where in result.produced:
            start = committed.get(TopicPartition(pipeline.requests, where.partition), 0)
            if start <= where.offset < start + MAX_IN_FLIGHT:
                inputs.add((where.partition, where.offset))
    return inputs


def published_just_before_death(killed: list[WorkerProcess]) -> set[tuple[int, int]]:
    """Inputs a killed worker published in its last moments: at most one in-flight window of them."""
    inputs: set[tuple[int, int]] = set()
    for worker in killed:
        events = worker.events("labelled") + worker.events("dead_lettered")
        events.sort(key=lambda e: e["timestamp"])
        inputs |= {(e["partition"], e["offset"]) for e in events[-MAX_IN_FLIGHT:]}
    return inputs


def test_broker_aborts_the_open_transaction_of_a_fenced_producer(broker: Any, new_topic: Callable[..., str]) -> None:
    """What exactly-once across crashes needs from the broker, and what Tansu 0.6.0 does not do.

    A restarted worker calls init_transactions with its predecessor's
    transactional id; Kafka then aborts the predecessor's open transaction.
    Tansu bumps the epoch but never writes the abort, and the records of the
    dead transaction become visible to read_committed readers.
    """
    topic = new_topic(1)
    crashed = KafkaProducer(bootstrap_servers=broker.bootstrap, transactional_id=f"{topic}-tx")
    crashed.init_transactions()
    crashed.begin_transaction()
    crashed.send(topic, b"from the transaction that never committed")
    crashed.flush()
    restarted = KafkaProducer(bootstrap_servers=broker.bootstrap, transactional_id=f"{topic}-tx")
    restarted.init_transactions()
    restarted.begin_transaction()
    restarted.send(topic, b"committed")
    restarted.commit_transaction()
    collector = OutputCollector(broker.bootstrap, topic, read_committed=True)
    try:
        collector.read_until_idle(idle_s=2.0)
        values = [r.value for r in collector.records]
    finally:
        collector.close()
        restarted.close(timeout=5)
        crashed.close(timeout=0)
    if b"from the transaction that never committed" in values:
        pytest.xfail("Tansu 0.6.0 leaves a fenced producer's open transaction visible to read_committed readers")
    assert values == [b"committed"]


# -- broker outage: SIGSTOP the broker mid-stream ------------------------------------------------

OUTAGE_REQUESTS = 1200
BROKER_OUTAGE_S = 20.0


# Known open defect, not a pass: in 1 of 3 full runs on 2026-12-04 both workers
# lost their partitions during the freeze (one because its poll thread sat in a
# 30 s producer flush, longer than max_poll_interval_ms) and were never assigned
# any again, so nothing more was committed. The other runs recovered by
# themselves. Non-strict, so it still runs, asserts, and passes when recovery works.
@pytest.mark.xfail(
    strict=False,
    reason="intermittent: after a 20 s broker freeze the group sometimes never reassigns partitions "
    "(kafka-python 3.0.12 against Tansu 0.6); under investigation, see issue 4",
)
@pytest.mark.timeout(240)
def test_broker_frozen_for_20s_mid_stream_workers_recover_and_lose_nothing(
    pipeline: Callable[..., Pipeline], broker: Any, sample_photos: list[Path],
) -> None:
    system = pipeline(4)
    stream = inline_stream(sample_photos, OUTAGE_REQUESTS, 4)
    workers = [system.start("a"), system.start("b")]
    collector = system.outputs()
    producer = PacedProducer(system.bootstrap, system.requests, stream.messages, 15.0).start()
    try:
        assert collector.read_until(lambda records: len(records) >= 200, START_TIMEOUT_S, workers[0].assert_alive)
        producer.hold()
        finished_before = len(outcomes_of(system, collector.records).finished)
        freeze_broker(broker, BROKER_OUTAGE_S)
        producer.release()
        produced = producer.join(120)
        wait_for_commits(system.bootstrap, system.group, true_end_offsets(system.requests, produced),
                         CATCH_UP_TIMEOUT_S, lambda: [w.assert_alive() for w in workers])
        outcomes = wait_until_finished(system, collector, stream, 30)
        for worker in workers:
            clean_stop(worker)
    finally:
        collector.close()

    assert finished_before < len(stream.keys), "the outage did not happen mid-stream"
    assert_nothing_lost(stream, outcomes)


def freeze_broker(broker: Any, seconds: float) -> None:
    """SIGSTOP the broker; it is resumed whatever happens (the fixture resumes it again after the test)."""
    resume = threading.Timer(seconds + 5.0, broker.resume)  # even if this thread is stuck
    broker.pause()
    try:
        resume.start()
        time.sleep(seconds)
    finally:
        broker.resume()
        resume.cancel()


# -- S3 outage: stop the S3 server mid-stream ------------------------------------------------------

S3_OUTAGE_S = 15.0
S3_REQUESTS = 600


def s3_stream(s3_client: Any, bucket: str, photos: list[Path], count: int, partitions: int) -> tuple[Stream, dict]:
    keys = upload_small_photos(s3_client, bucket, photos)
    objects = {key: s3_client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}
    return mixed_stream(count, partitions, [], 0, bucket, keys, s3_every=1), objects


@pytest.mark.timeout(240)
def test_s3_down_for_15s_mid_stream_retries_lose_nothing_and_dead_letter_nothing(
    pipeline: Callable[..., Pipeline], s3_server: Any, s3_client: Any, s3_gate: S3Gate,
    new_bucket: Callable[[], str], sample_photos: list[Path],
) -> None:
    system = pipeline(2, LABELSTREAM_S3__ENDPOINT_URL=s3_gate.endpoint_url, LABELSTREAM_RETRY__BUDGET_S="60")
    bucket = new_bucket()
    stream, objects = s3_stream(s3_client, bucket, sample_photos[:4], S3_REQUESTS, 2)
    worker = system.start("s3-outage")
    collector = system.outputs()
    producer = PacedProducer(system.bootstrap, system.requests, stream.messages, 15.0).start()
    try:
        assert collector.read_until(lambda records: len(records) >= 100, START_TIMEOUT_S, worker.assert_alive)
        finished_before = len(outcomes_of(system, collector.records).finished)
        s3_gate.close()
        s3_server.stop()
        try:
            _pause_reading(collector, S3_OUTAGE_S)
        finally:
            s3_server.start()
            restore_bucket(s3_client, bucket, objects)
            s3_gate.open()
        produced = producer.join(60)
        wait_for_commits(system.bootstrap, system.group, true_end_offsets(system.requests, produced),
                         CATCH_UP_TIMEOUT_S, worker.assert_alive)
        outcomes = wait_until_finished(system, collector, stream, 30)
        clean_stop(worker)
    finally:
        collector.close()

    assert finished_before < len(stream.keys), "the outage did not happen mid-stream"
    assert_nothing_lost(stream, outcomes)
    assert not outcomes.dead_letters
    assert not worker.events("dead_lettered")
    assert {e["code"] for e in worker.events("retrying")} == {"s3.connection_error"}


def restore_bucket(s3_client: Any, bucket: str, objects: dict[str, bytes]) -> None:
    """moto forgets everything on restart; real S3 would still have the bucket."""
    s3_client.create_bucket(Bucket=bucket)
    for key, body in objects.items():
        s3_client.put_object(Bucket=bucket, Key=key, Body=body)


# -- circuit breaker: good requests, then nothing but poison ---------------------------------------

GOOD_BEFORE_POISON = 40
POISON = 100


@pytest.mark.timeout(180)
def test_all_poison_opens_the_circuit_exit_3_and_commits_up_to_the_last_good_message(
    pipeline: Callable[..., Pipeline], sample_photos: list[Path],
) -> None:
    system = pipeline(1, LABELSTREAM_DEAD_LETTER__MAX_CONSECUTIVE="10")
    image = small_jpeg_base64(sample_photos[0])
    good = [(0, f"good-{i}".encode(), inline_request(f"good-{i}", image)) for i in range(GOOD_BEFORE_POISON)]
    poison = [(0, f"poison-{i}".encode(), b"{not json") for i in range(POISON)]
    produced = produce(system.bootstrap, system.requests, good + poison)
    last_good = produced[GOOD_BEFORE_POISON - 1].offset

    worker = system.start("breaker")
    code = worker.wait(START_TIMEOUT_S)
    collector = system.outputs()
    try:
        collector.read_until_idle()
    finally:
        collector.close()

    assert code == 3, worker.tail()
    (opened,) = worker.events("circuit_open")
    assert "10 dead letters in a row" in opened["reason"]
    assert committed_offsets(system.bootstrap, system.group) == {TopicPartition(system.requests, 0): last_good + 1}
    outcomes = outcomes_of(system, collector.records)
    assert set(outcomes.labels) == {f"good-{i}" for i in range(GOOD_BEFORE_POISON)}
    # The held run of dead letters is not published either: a restart after the fix reads it again.
    assert not outcomes.dead_letters


# -- graceful stop -------------------------------------------------------------------------------------

STOP_REQUESTS = 2000


@pytest.mark.timeout(180)
def test_sigterm_mid_stream_drains_commits_what_it_published_and_exits_0(
    pipeline: Callable[..., Pipeline], sample_photos: list[Path],
) -> None:
    system = pipeline(2)
    stream = inline_stream(sample_photos, STOP_REQUESTS, 2)
    produced = produce(system.bootstrap, system.requests, stream.messages)
    worker = system.start("graceful")
    collector = system.outputs()
    try:
        assert collector.read_until(lambda records: len(records) >= 300, START_TIMEOUT_S, worker.assert_alive)
        worker.signal(signal.SIGTERM)
        code = worker.wait(STOP_TIMEOUT_S)
        collector.read_until_idle()
    finally:
        collector.close()

    assert code == 0, worker.tail()
    assert worker.events("drained")[0]["abandoned"] == 0
    committed = committed_offsets(system.bootstrap, system.group)
    assert committed != true_end_offsets(system.requests, produced), "the stop did not come mid-stream"
    assert_commits_only_answered_inputs(system, produced, committed, outcomes_of(system, collector.records))


@pytest.mark.timeout(180)
def test_drain_timeout_abandons_unfinished_work_uncommitted_and_exits_1(
    pipeline: Callable[..., Pipeline], s3_client: Any, s3_gate: S3Gate, new_bucket: Callable[[], str],
    sample_photos: list[Path],
) -> None:
    system = pipeline(2, LABELSTREAM_S3__ENDPOINT_URL=s3_gate.endpoint_url, LABELSTREAM_WORKER__DRAIN_TIMEOUT_S="3")
    stream, _ = s3_stream(s3_client, new_bucket(), sample_photos[:4], 400, 2)
    produced = produce(system.bootstrap, system.requests, stream.messages)
    worker = system.start("drain-timeout")
    collector = system.outputs()
    try:
        assert collector.read_until(lambda records: len(records) >= 50, START_TIMEOUT_S, worker.assert_alive)
        s3_gate.close()
        worker.wait_for_event("retrying", 30)
        worker.signal(signal.SIGTERM)
        started = time.monotonic()
        code = worker.wait(STOP_TIMEOUT_S)
        stopped_after = time.monotonic() - started
        collector.read_until_idle()
    finally:
        collector.close()
        s3_gate.open()

    assert code == 1, worker.tail()
    assert stopped_after < 3 + 10
    assert worker.events("drained")[0]["abandoned"] > 0
    assert_abandoned_work_uncommitted(system, produced, outcomes_of(system, collector.records))


@pytest.mark.timeout(180)
def test_second_sigterm_during_a_long_drain_exits_at_once_without_committing_unfinished_work(
    pipeline: Callable[..., Pipeline], s3_client: Any, s3_gate: S3Gate, new_bucket: Callable[[], str],
    sample_photos: list[Path],
) -> None:
    system = pipeline(2, LABELSTREAM_S3__ENDPOINT_URL=s3_gate.endpoint_url, LABELSTREAM_RETRY__BUDGET_S="120",
                      LABELSTREAM_WORKER__DRAIN_TIMEOUT_S="120")
    stream, _ = s3_stream(s3_client, new_bucket(), sample_photos[:4], 400, 2)
    produced = produce(system.bootstrap, system.requests, stream.messages)
    worker = system.start("forced")
    collector = system.outputs()
    try:
        assert collector.read_until(lambda records: len(records) >= 50, START_TIMEOUT_S, worker.assert_alive)
        s3_gate.close()
        worker.wait_for_event("retrying", 30)
        worker.signal(signal.SIGTERM)
        worker.wait_for_event("draining", 10)
        _pause_reading(collector, 1.0)  # the drain commits what had finished; the rest is stuck on S3
        committed_while_draining = committed_offsets(system.bootstrap, system.group)
        worker.signal(signal.SIGTERM)
        code = worker.wait(5)
        collector.read_until_idle()
    finally:
        collector.close()
        s3_gate.open()

    assert code == 128 + signal.SIGTERM, worker.tail()
    assert worker.events("forced_exit")
    assert not worker.events("drained")
    assert committed_offsets(system.bootstrap, system.group) == committed_while_draining
    assert_abandoned_work_uncommitted(system, produced, outcomes_of(system, collector.records))


# -- rebalance: a member joins, then the first one leaves --------------------------------------------

REBALANCE_REQUESTS = 1000


@pytest.mark.timeout(240)
def test_member_joins_then_first_leaves_mid_stream_nothing_lost_and_commits_only_acknowledged_work(
    pipeline: Callable[..., Pipeline], sample_photos: list[Path],
) -> None:
    system = pipeline(4)
    stream = inline_stream(sample_photos, REBALANCE_REQUESTS, 4)
    first = system.start("first")
    collector = system.outputs()
    auditor = CommitAuditor(system)
    producer = PacedProducer(system.bootstrap, system.requests, stream.messages, 30.0).start()
    try:
        assert collector.read_until(lambda records: len(records) >= 100, START_TIMEOUT_S, first.assert_alive)
        second = system.start("second")
        first.wait_for_event("partitions_revoked", 60)
        second.wait_for_event("partitions_assigned", 30)
        auditor.sample()
        _pause_reading(collector, 2.0)
        clean_stop(first)
        auditor.sample()
        second.wait_for_events("partitions_assigned", 2, 60)
        produced = producer.join(60)
        wait_for_commits(system.bootstrap, system.group, true_end_offsets(system.requests, produced),
                         CATCH_UP_TIMEOUT_S, second.assert_alive)
        outcomes = wait_until_finished(system, collector, stream, 30)
        collector.read_until_idle()
        clean_stop(second)
    finally:
        collector.close()

    outcomes = outcomes_of(system, collector.records)
    assert_nothing_lost(stream, outcomes)
    auditor.check(produced, outcomes)
    assert len(second.events("partitions_assigned")) >= 2, "the second member never took over the first's partitions"
    # A cooperative handover commits before letting go; what it abandoned is bounded by the in-flight limit.
    assert sum(outcomes.labels.values()) - len(outcomes.labels) <= MAX_IN_FLIGHT


# -- a slow batch never costs the group membership ---------------------------------------------------------

SLOW_REQUESTS = 24
S3_DELAY_S = 6.0


@pytest.mark.timeout(180)
def test_batch_slower_than_max_poll_interval_causes_no_rebalance(
    pipeline: Callable[..., Pipeline], s3_client: Any, s3_gate: S3Gate, new_bucket: Callable[[], str],
    sample_photos: list[Path],
) -> None:
    """Every fetch (a HEAD and a GET, each held S3_DELAY_S) outlasts max_poll_interval_ms (10 s in tests).

    A worker that fetched on its poll thread would miss the poll deadline,
    be dropped from the group and log partitions_revoked or partitions_lost.
    """
    system = pipeline(1, LABELSTREAM_S3__ENDPOINT_URL=s3_gate.endpoint_url, LABELSTREAM_FETCH__THREADS="32")
    max_poll_interval_s = int(system.env["LABELSTREAM_KAFKA__MAX_POLL_INTERVAL_MS"]) / 1000
    stream, _ = s3_stream(s3_client, new_bucket(), sample_photos[:4], SLOW_REQUESTS, 1)
    worker = system.start("slow")
    collector = system.outputs()
    try:
        worker.wait_for_event("partitions_assigned", START_TIMEOUT_S)
        s3_gate.delay_s = S3_DELAY_S
        produce(system.bootstrap, system.requests, stream.messages)
        outcomes = wait_until_finished(system, collector, stream, 90, worker.assert_alive)
        clean_stop(worker)
    finally:
        collector.close()
        s3_gate.delay_s = 0.0

    assert_nothing_lost(stream, outcomes)
    fetch_ms = [e["timings_ms"]["fetch"] for e in worker.events("labelled")]
    assert min(fetch_ms) > max_poll_interval_s * 1000
    assert not worker.events("partitions_revoked") and not worker.events("partitions_lost")
    assert len(worker.events("partitions_assigned")) == 1
