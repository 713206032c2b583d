"""Driving real `labelstream run` subprocesses and reading back what they did.

Shared by the end-to-end and fault tests. Nothing here mocks anything: the
worker is a real process, the broker and S3 are the session's real servers,
and outputs and committed offsets are read back over the Kafka protocol.

Expected end offsets come from the producer's RecordMetadata, never from
`end_offsets()`, which Tansu 0.6.0 gets wrong for multi-record batches.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

REPO_ROOT = Path(__file__).resolve().parent.parent
POLL_S = 0.2


@dataclass
class WorkerProcess:
    """One `labelstream run` process; structlog writes its JSON lines to stderr."""

    name: str
    proc: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        found = []
        for line in self.stderr_path.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line still being written
            if name is None or event.get("event") == name:
                found.append(event)
        return found

    def wait_for_event(
        self, name: str, timeout_s: float, accept: Callable[[dict[str, Any]], bool] = bool
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            matching = [e for e in self.events(name) if accept(e)]
            if matching:
                return matching[0]
            self.assert_alive()
            time.sleep(POLL_S)
        raise AssertionError(f"{self.name}: no {name!r} log line within {timeout_s:.0f}s:\n{self.tail()}")

    def wait_for_events(self, name: str, count: int, timeout_s: float) -> list[dict[str, Any]]:
        """Until `count` log lines named `name` exist."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = self.events(name)
            if len(found) >= count:
                return found
            self.assert_alive()
            time.sleep(POLL_S)
        raise AssertionError(f"{self.name}: fewer than {count} {name!r} log lines in {timeout_s:.0f}s:\n{self.tail()}")

    def assert_alive(self) -> None:
        assert self.running, f"{self.name} exited {self.proc.returncode} early:\n{self.tail()}"

    def signal(self, sig: signal.Signals) -> None:
        if self.running:
            self.proc.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        """The exit code, or an assertion error if the process is still running after `timeout_s`."""
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout_s:.0f}s:\n{self.tail()}") from None

    def stop(self, timeout_s: float = 30.0) -> int:
        self.signal(signal.SIGTERM)
        return self.wait(timeout_s)

    def kill(self) -> None:
        """SIGKILL (a crash); safe to call on an exited process, so `finally` blocks can always call it."""
        if self.running:
            self.proc.kill()
        self.proc.wait(timeout=30)

    def log_text(self) -> str:
        """Everything the process wrote so far: stderr, then stdout."""
        return self.stderr_path.read_text(errors="replace") + self.stdout_path.read_text(errors="replace")

    def tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:]


def start_worker(env: dict[str, str], log_dir: Path, name: str, config: Path | None = None) -> WorkerProcess:
    argv = [sys.executable, "-m", "labelstream.cli", "run"] + (["--config", str(config)] if config else [])
    stdout_path, stderr_path = log_dir / f"{name}.stdout", log_dir / f"{name}.stderr"
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
    return WorkerProcess(name, proc, stdout_path, stderr_path)


# -- producing inputs -------------------------------------------------------------------


@dataclass(frozen=True)
class Produced:
    partition: int
    offset: int


def produce(
    bootstrap: str, topic: str, messages: Iterable[tuple[int, bytes | None, bytes | None]]
) -> list[Produced]:
    """Send (partition, key, value) with acks=all; where each one landed, in order."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    try:
        futures = [producer.send(topic, key=key, value=value, partition=p) for p, key, value in messages]
        producer.flush(timeout=60)
        metadata = [f.get(timeout=60) for f in futures]
    finally:
        producer.close()
    return [Produced(m.partition, m.offset) for m in metadata]


def true_end_offsets(topic: str, produced: Iterable[Produced]) -> dict[TopicPartition, int]:
    ends: dict[TopicPartition, int] = {}
    for item in produced:
        tp = TopicPartition(topic, item.partition)
        ends[tp] = max(ends.get(tp, 0), item.offset + 1)
    return ends


# -- reading back offsets and outputs --------------------------------------------------------


def committed_offsets(bootstrap: str, group: str) -> dict[TopicPartition, int]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        answer = admin.list_group_offsets({group: None}).get(group, {})
    finally:
        admin.close()
    return {tp: meta.offset for tp, meta in answer.items() if meta.offset >= 0}


def wait_for_commits(
    bootstrap: str,
    group: str,
    expected: dict[TopicPartition, int],
    timeout_s: float,
    alive: Callable[[], None] = lambda: None,
    exact: bool = False,
) -> None:
    """Until the group has committed exactly `expected`; `alive` may raise to fail fast.

    By default partitions outside `expected` are ignored; with `exact` the whole
    committed map must equal `expected` (no extra partitions).
    """
    deadline = time.monotonic() + timeout_s
    seen: dict[TopicPartition, int] = {}
    while time.monotonic() < deadline:
        alive()
        seen = committed_offsets(bootstrap, group)
        if (seen == expected) if exact else all(seen.get(tp) == end for tp, end in expected.items()):
            return
        time.sleep(0.5)
    raise AssertionError(f"group {group} committed {seen}, expected {expected} within {timeout_s:.0f}s")


def topic_reader(bootstrap: str, *topics: str, read_committed: bool = False) -> KafkaConsumer:
    """A group-less reader from the beginning: it commits nothing and joins no group."""
    return KafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level="read_committed" if read_committed else "read_uncommitted",
    )


def assigned_reader(bootstrap: str, *topics: str) -> KafkaConsumer:
    """A group-less reader assigned every partition of `topics`, from the beginning.

    Unlike `topic_reader`, its assignment is known at once, so `read_to_end`
    can ask for end offsets before the first poll.
    """
    reader = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                           enable_auto_commit=False)
    partitions = [TopicPartition(t, p) for t in topics for p in sorted(reader.partitions_for_topic(t))]
    assert len(partitions) >= len(topics), f"no partitions found for {topics}"
    reader.assign(partitions)
    reader.seek_to_beginning()
    return reader


def read_to_end(reader: KafkaConsumer, timeout_s: float = 20.0, idle_s: float = 1.0) -> list[ConsumerRecord]:
    """Everything left to read on an assigned reader.

    Tansu's end offsets are only a lower bound (the last batch's base + 1), so
    read at least that far, then until nothing new arrives for `idle_s`.
    """
    at_least = reader.end_offsets(list(reader.assignment()))
    records: list[ConsumerRecord] = []
    deadline = time.monotonic() + timeout_s
    last_new = time.monotonic()
    while time.monotonic() < deadline:
        for batch in reader.poll(timeout_ms=200).values():
            records += batch
            last_new = time.monotonic()
        caught_up = all(reader.position(tp) >= end for tp, end in at_least.items())
        if caught_up and time.monotonic() - last_new >= idle_s:
            return records
    raise AssertionError(f"could not read to the end of {sorted(at_least)} within {timeout_s:.0f}s")


def read_all(bootstrap: str, *topics: str, timeout_s: float = 20.0) -> list[ConsumerRecord]:
    """Every record on `topics`, read to the end by a throwaway `assigned_reader`."""
    reader = assigned_reader(bootstrap, *topics)
    try:
        return read_to_end(reader, timeout_s)
    finally:
        reader.close()


class OutputCollector:
    """Keeps reading output topics; every record seen so far stays in `records`."""

    def __init__(self, bootstrap: str, *topics: str, read_committed: bool = False) -> None:
        self.reader = topic_reader(bootstrap, *topics, read_committed=read_committed)
        self.records: list[ConsumerRecord] = []

    def poll(self, timeout_ms: int = 200) -> int:
        before = len(self.records)
        for batch in self.reader.poll(timeout_ms=timeout_ms).values():
            self.records += batch
        return len(self.records) - before

    def read_until(self, done: Callable[[list[ConsumerRecord]], bool], timeout_s: float,
                   alive: Callable[[], None] = lambda: None) -> bool:
        deadline = time.monotonic() + timeout_s
        while not done(self.records):
            if time.monotonic() > deadline:
                return False
            alive()
            self.poll()
        return True

    def read_until_idle(self, idle_s: float = 2.0, timeout_s: float = 30.0) -> None:
        """Until nothing new arrives for `idle_s` (end_offsets cannot be trusted on Tansu)."""
        deadline = time.monotonic() + timeout_s
        last_new = time.monotonic()
        while time.monotonic() - last_new < idle_s and time.monotonic() < deadline:
            if self.poll(timeout_ms=300):
                last_new = time.monotonic()

    def on(self, topic: str) -> list[ConsumerRecord]:
        return [r for r in self.records if r.topic == topic]

    def close(self) -> None:
        self.reader.close()
