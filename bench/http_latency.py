"""The `http_latency` row: single-image /v1/classify latency with and without a Kafka backlog.

One `labelstream run --http` process serves both paths from one model. The
same sequence of requests (one S3 image each, one at a time over a kept-alive
connection) is timed twice: with the requests topic idle, then while a
backlog of the whole corpus is being consumed. HTTP items take at least
`http.batch_share` of every batch, so the backlog should cost them about one
batch time, not a place at the end of the queue.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

from bench.rows import Bench, _percentile
from bench.stream import LOG_DIR, BATCH_SIZE, Services, Topics, Worker, collect_outputs, labelstream_command, produce_all
from bench.table import Row

KEY = "sk-bench"
TAXONOMY = "everyday"


@dataclass(frozen=True)
class Sides:
    requests: int
    backlog: int
    idle_ms: list[float]
    # Only requests answered while the backlog was still being consumed.
    loaded_ms: list[float]
    backlog_s: float
    # (sum, count) of the histograms behind the notes, before and after each side.
    marks: tuple[dict[str, tuple[float, float]], ...]


def http_latency(bench: Bench) -> list[Row]:
    sides = _measure(bench, 5 if bench.quick else 200)
    idle_p50, idle_p99 = _percentile(sorted(sides.idle_ms), 50), _percentile(sorted(sides.idle_ms), 99)
    p50, p99 = _percentile(sorted(sides.loaded_ms), 50), _percentile(sorted(sides.loaded_ms), 99)
    before_idle, before_loaded, after_loaded = sides.marks
    return [Row(
        "http_latency", f"backlog p50 {p50:.0f} ms, p99 {p99:.0f} ms", f"idle p50 {idle_p50:.0f} ms, p99 {idle_p99:.0f} ms",
        p50 / idle_p50 if idle_p50 else None, "(printed only)", None, "INFO",
        [f"{sides.requests} sequential single-image /v1/classify requests (S3 images, taxonomy {TAXONOMY}) per side, "
         f"one `labelstream run --http` process, batch {BATCH_SIZE}, http.batch_share 0.5; ratio = p50 backlog / p50 idle",
         f"backlog: {sides.backlog} Kafka requests produced just before the second side, consumed in "
         f"{sides.backlog_s:.1f} s; {len(sides.loaded_ms)} of its {sides.requests} HTTP requests were answered before "
         "the backlog ran out, and only those are counted",
         "mean wait of an HTTP item from being queued to its batch starting: "
         f"{_mean_ms(before_loaded, after_loaded, 'queue_http')} with the backlog, "
         f"{_mean_ms(before_idle, before_loaded, 'queue_http')} idle; mean model call of a batch: "
         f"{_mean_ms(before_loaded, after_loaded, 'infer')} with the backlog, "
         f"{_mean_ms(before_idle, before_loaded, 'infer')} idle. On 2 CPU cores the model shares them with the "
         "stream's decoding, so a batch takes longer under a backlog, and an HTTP request waits for the batch "
         "already running plus its own"],
    )]  # fmt: skip


def _measure(bench: Bench, requests: int) -> Sides:
    keys = bench.corpus_keys()
    # Twice the corpus (dedupe is off, so every copy reaches the model): long enough to outlast the timed requests.
    backlog = keys + keys
    services, topics = bench.services, Topics.create(bench.services.bootstrap)
    port = _free_port()
    env = bench.env(topics, LABELSTREAM_HTTP__HOST="127.0.0.1", LABELSTREAM_HTTP__PORT=str(port),
                    LABELSTREAM_HTTP__API_KEYS=json.dumps([KEY]), LABELSTREAM_CACHE__MAX_ENTRIES="0")
    with _http_worker(env) as worker, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120,
                                                   headers={"Authorization": f"Bearer {KEY}"}) as client:
        _wait_until_ready(client, worker)
        warmup = bench.warmup_keys()
        produce_all(services.bootstrap, topics.requests, services.bucket, warmup, id_prefix="warmup-")
        collect_outputs(services.bootstrap, topics, len(warmup), timeout_s=300, worker=worker)
        _timed(client, services, warmup[:4])
        marks = [_means(client)]
        idle = [ms for ms, _ in _timed(client, services, _cycle(keys, requests))]
        marks.append(_means(client))
        produce_all(services.bootstrap, topics.requests, services.bucket, backlog, id_prefix="backlog-")
        started = time.time()
        timed = _timed(client, services, _cycle(list(reversed(keys)), requests))
        marks.append(_means(client))
        outputs = collect_outputs(services.bootstrap, topics, len(warmup) + len(backlog),
                                  timeout_s=600 + len(backlog) / 5, worker=worker)
    backlog_end = max(o.timestamp_ms / 1000 for o in outputs if o.request_id.startswith("backlog-"))
    loaded = [ms for ms, finished in timed if finished <= backlog_end] or [float("nan")]
    return Sides(requests, len(backlog), idle, loaded, backlog_end - started, tuple(marks))


def _timed(client: httpx.Client, services: Services, keys: list[str]) -> list[tuple[float, float]]:
    """(latency in ms, epoch seconds when answered) per request, sent one at a time."""
    latencies = []
    for key in keys:
        started = time.perf_counter()
        response = client.post("/v1/classify", json={"input": f"s3://{services.bucket}/{key}", "taxonomy": TAXONOMY})
        latencies.append(((time.perf_counter() - started) * 1000, time.time()))
        if response.status_code != 200:
            raise RuntimeError(f"/v1/classify answered {response.status_code}: {response.text[:300]}")
    return latencies


def _cycle(keys: list[str], count: int) -> list[str]:
    return [keys[index % len(keys)] for index in range(count)]


@contextmanager
def _http_worker(env: dict[str, str]) -> Iterator[Worker]:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / f"http_latency-{uuid.uuid4().hex[:6]}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([*labelstream_command(), "--http"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    worker = Worker(proc, log_path)
    try:
        yield worker
    finally:
        worker.stop()


def _wait_until_ready(client: httpx.Client, worker: Worker, timeout_s: float = 180.0) -> None:
    """Until /readyz says yes: the model is loaded and the consumer holds its partitions."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        worker.check_alive()
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the worker's HTTP API was not ready within {timeout_s:.0f}s\n{worker.log_tail()}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


_SERIES = {
    "queue_http": ("labelstream_inference_queue_seconds", {"source": "http"}),
    "infer": ("labelstream_stage_seconds", {"stage": "infer"}),
}


def _means(client: httpx.Client) -> dict[str, tuple[float, float]]:
    """(sum, count) of the histograms behind the notes, from the worker's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    found = {name: (0.0, 0.0) for name in _SERIES}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for name, (metric, labels) in _SERIES.items():
            if family.name != metric:
                continue
            picked = [s for s in family.samples if all(s.labels.get(k) == v for k, v in labels.items())]
            total = sum(s.value for s in picked if s.name.endswith("_sum"))
            count = sum(s.value for s in picked if s.name.endswith("_count"))
            found[name] = (total, count)
    return found


def _mean_ms(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]], name: str) -> str:
    total = after[name][0] - before[name][0]
    count = after[name][1] - before[name][1]
    return f"{total / count * 1000:.0f} ms" if count else "n/a"
