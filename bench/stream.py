"""Driving the real streaming path: embedded Tansu and moto S3, `labelstream run` subprocesses.

Nothing is mocked. Requests go to a real Kafka-protocol broker, images sit in
a real S3 HTTP server, and the worker is the `labelstream run` console script
in its own process. Outputs are read back over the Kafka protocol.
"""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, KafkaProducer

from bench.corpus import CACHE_DIR, tiny_model_files
from labelstream.embedded import EmbeddedBroker, EmbeddedS3, create_topic
from pipeline.taxonomy import everyday_taxonomy_path
from schemas.requests import ImageSource, Request, S3Source

DUMMY_AWS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
# Quick group joins on Tansu (kafka-python's 45 s default session timeout makes them take > 25 s).
FAST_KAFKA = {
    "LABELSTREAM_KAFKA__SESSION_TIMEOUT_MS": "6000",
    "LABELSTREAM_KAFKA__HEARTBEAT_INTERVAL_MS": "1000",
    "LABELSTREAM_KAFKA__MAX_POLL_INTERVAL_MS": "30000",
}
BATCH_SIZE = 32
LOG_DIR = CACHE_DIR / "logs"
# Outputs published within this of each other belong to the same commit.
_BURST_S = 0.005


@dataclass
class Services:
    bootstrap: str
    endpoint_url: str
    bucket: str
    s3: Any
    # The S3 server's and the broker's processes, whose CPU shares the machine with the worker.
    service_pids: tuple[int, ...] = ()

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds_of(pid) for pid in self.service_pids)


@contextmanager
def running_services() -> Iterator[Services]:
    os.environ.update(DUMMY_AWS)
    import boto3

    with EmbeddedBroker() as broker, EmbeddedS3() as s3_server:
        client = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1")
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        client.create_bucket(Bucket=bucket)
        yield Services(broker.bootstrap, s3_server.endpoint_url, bucket, client, _pids(broker, s3_server))


def _pids(*services: Any) -> tuple[int, ...]:
    # EmbeddedBroker/EmbeddedS3 keep their Popen private; the bench only reads its pid for /proc.
    procs = (getattr(getattr(service, "process", None), "_proc", None) for service in services)
    return tuple(proc.pid for proc in procs if proc is not None)


def upload(services: Services, files: list[Path], prefix: str) -> list[str]:
    """Put each file at `prefix/<index>-<name>`; the keys, in order."""
    keys = [f"{prefix}/{index:05d}-{path.name}" for index, path in enumerate(files)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kp: services.s3.put_object(Bucket=services.bucket, Key=kp[0], Body=kp[1].read_bytes()),
                      zip(keys, files, strict=True)))
    return keys


@dataclass(frozen=True)
class Topics:
    requests: str
    labels: str
    embeddings: str
    dlq: str
    taxonomies: str

    @classmethod
    def create(cls, bootstrap: str, partitions: int = 3) -> Topics:
        run = uuid.uuid4().hex[:8]
        topics = cls(*(f"bench-{run}-{kind}" for kind in ("requests", "labels", "embeddings", "dlq", "taxonomies")))
        for name in (topics.requests, topics.labels, topics.embeddings, topics.dlq, topics.taxonomies):
            create_topic(bootstrap, name, partitions if name == topics.requests else 1)
        return topics

    def env(self) -> dict[str, str]:
        return {f"LABELSTREAM_TOPICS__{kind.upper()}": getattr(self, kind)
                for kind in ("requests", "labels", "embeddings", "dlq", "taxonomies")}


def request_for(bucket: str, key: str, request_id: str) -> bytes:
    request = Request(id=request_id, image=ImageSource(s3=S3Source(bucket=bucket, key=key)), metadata={})
    return request.model_dump_json().encode()


def produce_all(bootstrap: str, topic: str, bucket: str, keys: list[str], id_prefix: str = "") -> list[str]:
    """One request per key (ids "<prefix><n>:<key>", unique even when keys repeat), all acknowledged."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    ids = [f"{id_prefix}{index}:{key}" for index, key in enumerate(keys)]
    try:
        pairs = zip(ids, keys, strict=True)
        futures = [producer.send(topic, key=i.encode(), value=request_for(bucket, k, i)) for i, k in pairs]
        producer.flush(timeout=60)
        for future in futures:
            future.get(timeout=60)
    finally:
        producer.close()
    return ids


def worker_env(services: Services, topics: Topics, group: str, **extra: str) -> dict[str, str]:
    config, checkpoint = tiny_model_files()
    return {
        **os.environ, **DUMMY_AWS, **FAST_KAFKA, **topics.env(),
        "LABELSTREAM_KAFKA__BOOTSTRAP_SERVERS": services.bootstrap,
        "LABELSTREAM_KAFKA__GROUP_ID": group,
        "LABELSTREAM_S3__ENDPOINT_URL": services.endpoint_url,
        "LABELSTREAM_MODEL__NAME": str(config),
        "LABELSTREAM_MODEL__PRETRAINED": str(checkpoint),
        "LABELSTREAM_MODEL__DEVICE": "cpu",
        "LABELSTREAM_TAXONOMY__PATH": str(everyday_taxonomy_path()),
        "LABELSTREAM_TAXONOMY__FEED_ENABLED": "false",
        "LABELSTREAM_TAXONOMY__WATCH_INTERVAL_S": "0",
        "LABELSTREAM_BATCH__MAX_SIZE": str(BATCH_SIZE),
        "LABELSTREAM_LOG__FORMAT": "json",
        # No metrics server: the bench reads outputs and /proc, and port 9400 may be taken by another run.
        "LABELSTREAM_METRICS__PORT": "0",
        **extra,
    }  # fmt: skip


def labelstream_command() -> list[str]:
    """The installed `labelstream` console script, else the module."""
    script = Path(sys.executable).with_name("labelstream")
    return [str(script), "run"] if script.is_file() else [sys.executable, "-m", "labelstream.cli", "run"]


@dataclass
class Worker:
    """A `labelstream run` process; its JSON logs go to a file under bench/.cache/logs."""

    proc: subprocess.Popen[bytes]
    log_path: Path

    @classmethod
    def start(cls, env: dict[str, str], name: str) -> Worker:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        log_path = LOG_DIR / f"{name}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(labelstream_command(), env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        return cls(proc, log_path)

    def rss_bytes(self) -> int:
        return rss_of(self.proc.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds_of(self.proc.pid)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker exited {self.proc.returncode}; log {self.log_path}:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 60.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


@contextmanager
def running_worker(env: dict[str, str], name: str) -> Iterator[Worker]:
    worker = Worker.start(env, name)
    try:
        yield worker
    finally:
        worker.stop()


def cpu_seconds_of(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_of(pid: int) -> int:
    """Resident set size in bytes, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class Output:
    request_id: str
    topic: str
    timestamp_ms: int
    received_s: float
    value: dict[str, Any] = field(default_factory=dict)


def collect_outputs(
    bootstrap: str,
    topics: Topics,
    expected: int,
    timeout_s: float,
    worker: Worker | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> list[Output]:
    """Label and dead-letter records until `expected` distinct request ids have one, in arrival order."""
    reader = KafkaConsumer(topics.labels, topics.dlq, bootstrap_servers=bootstrap, group_id=None,
                           auto_offset_reset="earliest", enable_auto_commit=False, fetch_max_wait_ms=20)
    seen: dict[str, Output] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(seen) < expected:
            if time.monotonic() > deadline:
                tail = worker.log_tail() if worker else ""
                raise TimeoutError(f"only {len(seen)} of {expected} outputs within {timeout_s:.0f}s\n{tail}")
            if worker is not None:
                worker.check_alive()
            for record in _poll_records(reader):
                output = _output_of(record)
                seen.setdefault(output.request_id, output)
            if on_progress is not None:
                on_progress(len(seen))
    finally:
        reader.close()
    return sorted(seen.values(), key=lambda o: (o.timestamp_ms, o.received_s))


def _poll_records(reader: KafkaConsumer) -> list[Any]:
    return [record for batch in reader.poll(timeout_ms=100).values() for record in batch]


def _output_of(record: Any) -> Output:
    received = time.time()
    key = record.key.decode() if record.key else ""
    value = json.loads(record.value) if record.topic.endswith("-labels") else {"dead_letter": True}
    return Output(value.get("id", key), record.topic, record.timestamp, received, value)


def rate_since(outputs: list[Output], started_s: float, parts: int = 4) -> tuple[float, float]:
    """(images/s, noise) of outputs whose requests were all produced at `started_s` (epoch seconds).

    The rate runs from the start to the last output's timestamp (when the
    worker published it). The noise is the relative standard error of the
    rates of `parts` consecutive slices of the run: the measurement repeated
    `parts` times within the same run. Outputs are published in bursts (one
    per commit), so slices end at a burst and take all of it.
    """
    stamps = sorted(o.timestamp_ms / 1000.0 for o in outputs)
    if len(stamps) < 2 * parts:
        return float("nan"), float("nan")
    rate = len(stamps) / max(stamps[-1] - started_s, 1e-3)
    ends = sorted({stamps[len(stamps) * (i + 1) // parts - 1] for i in range(parts)})
    done = [sum(1 for stamp in stamps if stamp <= end + _BURST_S) for end in ends]
    spans = zip([0, *done], done, [started_s, *ends], ends)
    slices = [(after - before) / max(end - start, 1e-3) for before, after, start, end in spans]
    return rate, relative_standard_error(slices)


def relative_standard_error(values: list[float]) -> float:
    """Standard error of the mean over the mean: how far the mean of `values` is likely off."""
    if len(values) < 2:
        return 0.0
    return statistics.stdev(values) / math.sqrt(len(values)) / statistics.fmean(values)
