"""The rows of `make bench`, each measured side by side with its baseline in the same run."""

from __future__ import annotations

import math
import random
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from kafka import KafkaProducer

from bench import eval_iteration, naive, preprocess_bench
from bench.corpus import CACHE_DIR, mixed_jpegs, sized_jpegs, tiny_model_files
from bench.stream import (
    BATCH_SIZE, Output, Services, Topics, collect_outputs, produce_all, rate_since, request_for, running_services,
    relative_standard_error, running_worker, upload, worker_env,
)  # fmt: skip
from bench.table import Row, at_least, at_most
from pipeline.config import Settings
from pipeline.labeler import Labeler, build_labeler
from pipeline.taxonomy import everyday_taxonomy_path

CLASSIFIER_CACHE = CACHE_DIR / "classifiers"
# Images labelled before any measurement, so a worker is timed warm (connections, first model calls).
WARMUP_IMAGES = 32


@dataclass(frozen=True)
class Sizes:
    """How much each row does: the full bench, or a seconds-long smoke run."""

    e2e_images: int
    naive_images: int
    naive_repeats: int
    offline_repeats: int
    preprocess_images: tuple[int, int]
    preprocess_seconds: float
    preprocess_repeats: int
    drift_mixed_images: int
    dedupe_messages: int
    memory_marks: tuple[int, int]
    latency_seconds: float
    eval_per_class: int
    eval_repeats: int


FULL = Sizes(
    e2e_images=1200, naive_images=200, naive_repeats=3, offline_repeats=3, preprocess_images=(12, 6),
    preprocess_seconds=2.0, preprocess_repeats=3, drift_mixed_images=200, dedupe_messages=1200,
    memory_marks=(1_000, 10_000), latency_seconds=30.0, eval_per_class=100, eval_repeats=2,
)
QUICK = Sizes(
    e2e_images=16, naive_images=6, naive_repeats=2, offline_repeats=1, preprocess_images=(2, 1),
    preprocess_seconds=0.1, preprocess_repeats=2, drift_mixed_images=2, dedupe_messages=16,
    memory_marks=(10, 100), latency_seconds=3.0, eval_per_class=3, eval_repeats=1,
)


@dataclass(frozen=True)
class WorkerRun:
    rate: float
    noise: float
    outputs: list[Output]
    # Worker process CPU time per measured message (all threads), independent of other load on the machine.
    cpu_ms_per_message: float
    # The same for the S3 server and the broker together.
    services_cpu_ms_per_message: float


class Bench:
    """Shared, lazily started state: services, uploaded corpus, the offline labeler, the worker's rate."""

    def __init__(self, sizes: Sizes, quick: bool, stack: ExitStack) -> None:
        self.sizes, self.quick, self._stack = sizes, quick, stack
        self._services: Services | None = None
        self._all_keys: list[str] = []
        self._labeler: Labeler | None = None
        self._worker_run: WorkerRun | None = None

    @property
    def services(self) -> Services:
        if self._services is None:
            self._services = self._stack.enter_context(running_services())
        return self._services

    def corpus_keys(self) -> list[str]:
        """The mixed corpus, uploaded to S3 once."""
        return self._uploaded()[: self.sizes.e2e_images]

    def warmup_keys(self) -> list[str]:
        """Other images from the same corpus, never measured."""
        return self._uploaded()[self.sizes.e2e_images :]

    def _uploaded(self) -> list[str]:
        if not self._all_keys:
            files = mixed_jpegs(self.sizes.e2e_images + WARMUP_IMAGES)
            self._all_keys = upload(self.services, files, "mixed")
        return self._all_keys

    def env(self, topics: Topics, **extra: str) -> dict[str, str]:
        return worker_env(self.services, topics, f"bench-{uuid.uuid4().hex[:8]}",
                          LABELSTREAM_TAXONOMY__CACHE_DIR=str(CLASSIFIER_CACHE), **extra)

    def labeler(self) -> Labeler:
        """The offline path's engine (the worker's model, taxonomy and batch size), warmed up."""
        if self._labeler is None:
            self._labeler = build_labeler(offline_settings())
            _warm_up(self._labeler)
        return self._labeler

    def worker(self) -> WorkerRun:
        """The worker over the whole mixed corpus (measured once, shared by two rows)."""
        if self._worker_run is None:
            self._worker_run = self.stream(self.corpus_keys(), "e2e")
        return self._worker_run

    def stream(self, keys: list[str], name: str, **extra_env: str) -> WorkerRun:
        """A fresh worker on fresh topics: warmed up first, then timed over one request per key."""
        services, topics = self.services, Topics.create(self.services.bootstrap)
        warmup = self.warmup_keys()
        with running_worker(self.env(topics, **extra_env), name) as worker:
            produce_all(services.bootstrap, topics.requests, services.bucket, warmup, id_prefix="warmup-")
            collect_outputs(services.bootstrap, topics, len(warmup), timeout_s=300, worker=worker)
            started, cpu_before, services_before = time.time(), worker.cpu_seconds(), services.cpu_seconds()
            ids = set(produce_all(services.bootstrap, topics.requests, services.bucket, keys))
            outputs = collect_outputs(services.bootstrap, topics, len(warmup) + len(keys),
                                      timeout_s=600 + len(keys) / 5, worker=worker)
            cpu_ms = (worker.cpu_seconds() - cpu_before) * 1000 / max(len(keys), 1)
            services_ms = (services.cpu_seconds() - services_before) * 1000 / max(len(keys), 1)
        measured = [o for o in outputs if o.request_id in ids]
        rate, noise = rate_since(measured, started)
        return WorkerRun(rate, noise, measured, cpu_ms, services_ms)


def _warm_up(labeler: Labeler) -> None:
    # First calls at a new batch shape are slow on the CPU too; the worker gets the same warm-up.
    from labelstream.classify import classify_images

    files = [str(path) for path in mixed_jpegs(WARMUP_IMAGES)]
    classify_images(labeler, offline_settings(), files)
    classifier = labeler.classifier_for(None)
    labeler.label([labeler.prepare_bytes(Path(files[0]).read_bytes()).pixels], [classifier])


def offline_settings() -> Settings:
    config, checkpoint = tiny_model_files()
    return Settings.model_validate({
        "model": {"name": str(config), "pretrained": str(checkpoint), "device": "cpu"},
        "taxonomy": {"path": str(everyday_taxonomy_path()), "feed_enabled": False, "watch_interval_s": 0,
                     "cache_dir": str(CLASSIFIER_CACHE)},
        "batch": {"max_size": BATCH_SIZE},
    })


# -- e2e_vs_offline -----------------------------------------------------------


def e2e_vs_offline(bench: Bench) -> list[Row]:
    files = [str(path) for path in mixed_jpegs(bench.sizes.e2e_images)]
    offline = [_offline_rate(bench, files)]
    run = bench.worker()
    offline += [_offline_rate(bench, files) for _ in range(bench.sizes.offline_repeats - 1)]
    offline_rate = statistics.fmean(offline)
    noise = _combined(run.noise, relative_standard_error(offline))
    ratio = _ratio(run.rate, offline_rate)
    return [Row(
        "e2e_vs_offline", f"worker {run.rate:.1f} img/s", f"offline classify {offline_rate:.1f} img/s", ratio,
        ">= 0.90", noise, _verdict(bench, at_least(ratio, 0.90, noise)),
        [f"{len(files)} JPEGs, 250x250 to 1920x1080; tiny model, batch {BATCH_SIZE}, fp32, CPU; "
         f"offline runs: {', '.join(f'{r:.1f}' for r in offline)} img/s"],
    )]  # fmt: skip


def _offline_rate(bench: Bench, files: list[str]) -> float:
    from labelstream.classify import classify_images

    labeler = bench.labeler()
    started = time.perf_counter()
    results = classify_images(labeler, offline_settings(), files)
    elapsed = time.perf_counter() - started
    failed = [r for r in results if r.error]
    if failed:
        raise RuntimeError(f"offline classify failed on {len(failed)} images, e.g. {failed[0].error}")
    return len(files) / elapsed


def _ratio(value: float, baseline: float) -> float:
    # A quick run can finish inside one publish, leaving no window to measure a rate in.
    return value / baseline if baseline > 0 else float("nan")


def _combined(*noises: float) -> float:
    """Relative noise of a ratio from its sides' relative noises (independent errors add in quadrature)."""
    return math.sqrt(sum(noise * noise for noise in noises))


def _verdict(bench: Bench, verdict: str) -> str:
    # Quick runs are too small for their numbers to mean anything.
    return "QUICK" if bench.quick else verdict


# -- pipelined_vs_naive -------------------------------------------------------


def pipelined_vs_naive(bench: Bench) -> list[Row]:
    sample = _spread_sample(bench.corpus_keys(), bench.sizes.naive_images)
    topics = Topics.create(bench.services.bootstrap)
    produce_all(bench.services.bootstrap, topics.requests, bench.services.bucket, sample)
    rates = [naive.naive_rate(bench.services, topics, bench.labeler(), len(sample), timeout_s=600)
             for _ in range(bench.sizes.naive_repeats)]
    run = bench.worker()
    naive_rate = statistics.fmean(rates)
    noise = _combined(run.noise, relative_standard_error(rates))
    ratio = _ratio(run.rate, naive_rate)
    return [Row(
        "pipelined_vs_naive", f"worker {run.rate:.1f} img/s", f"naive loop {naive_rate:.1f} img/s", ratio, ">= 3",
        noise, _verdict(bench, at_least(ratio, 3.0, noise)),
        [f"naive: bench/naive.py, {len(sample)} of the same JPEGs (every size), runs "
         f"{', '.join(f'{r:.1f}' for r in rates)} img/s"],
    )]  # fmt: skip


def _spread_sample(keys: list[str], count: int) -> list[str]:
    # An odd stride visits every one of the 8 cycled sizes.
    stride = max(1, len(keys) // count)
    stride -= 1 if stride % 2 == 0 else 0
    return keys[:: max(stride, 1)][:count]


# -- fast_vs_exact_preprocess -------------------------------------------------


def fast_vs_exact(bench: Bench) -> list[Row]:
    sizes = bench.sizes
    hd = sized_jpegs(sizes.preprocess_images[0], (1920, 1080))
    large = sized_jpegs(sizes.preprocess_images[1], (4000, 3000))
    rows = [_speed_row(bench, "1080p", hd, 2.0), _speed_row(bench, "4000x3000", large, 4.0)]
    drift = preprocess_bench.measure_drift(hd + large + mixed_jpegs(sizes.drift_mixed_images))
    rows[-1].notes.append(
        f"drift of the model input (normalised units), {drift.images} images: mean |d| {drift.mean_abs:.4f}, "
        f"max |d| {drift.max_abs:.3f}; top-1 agreement {drift.top1_agreement * 100:.1f}% "
        "(tiny seed-0 model at 320 px, everyday taxonomy)"
    )
    return rows


def _speed_row(bench: Bench, label: str, files: list[Path], target: float) -> Row:
    sizes = bench.sizes
    result = preprocess_bench.compare_speed(files, sizes.preprocess_seconds, sizes.preprocess_repeats)
    return Row(
        f"fast_vs_exact_preprocess {label}", f"fast {result.fast_per_core:.1f} img/s/core",
        f"exact {result.exact_per_core:.1f} img/s/core", result.ratio, f">= {target:g}", result.noise,
        _verdict(bench, at_least(result.ratio, target, result.noise)),
    )


# -- dedupe -------------------------------------------------------------------


def dedupe(bench: Bench) -> list[Row]:
    count = bench.sizes.dedupe_messages
    keys = bench.corpus_keys()[:count]
    unique = bench.stream(keys, "dedupe-unique")
    half = keys[: count // 2]
    # Re-uploads of images seen earlier in the stream: every copy is produced after all originals,
    # in shuffled order, so none is adjacent to its original.
    copies = random.Random(0).sample(_copy_objects(bench, half), len(half))
    duplicated = bench.stream(half + copies, "dedupe-half")
    ratio = _ratio(duplicated.rate, unique.rate)
    noise = _combined(unique.noise, duplicated.noise)
    hits = sum(1 for o in duplicated.outputs if o.value.get("cache_hit"))
    return [Row(
        "dedupe", f"50% duplicates {duplicated.rate:.1f} img/s", f"no duplicates {unique.rate:.1f} img/s", ratio,
        ">= 1.6", noise, _verdict(bench, at_least(ratio, 1.6, noise)),
        [f"{count} messages each (3 partitions); the second stream is {len(half)} distinct images, then byte-identical "
         f"copies of them under other S3 keys in shuffled order (re-uploads of earlier images, none adjacent)",
         f"cache_hit records: {hits} of {len(duplicated.outputs)} ({hits / max(len(duplicated.outputs), 1):.0%}; "
         f"{len(copies)} are copies: a copy misses when its partition reaches it before another partition has "
         "labelled the original, as in-flight duplicates are not coalesced)",
         f"CPU per message, with vs without duplicates: worker {duplicated.cpu_ms_per_message:.1f} vs "
         f"{unique.cpu_ms_per_message:.1f} ms, S3 server + broker {duplicated.services_cpu_ms_per_message:.1f} vs "
         f"{unique.services_cpu_ms_per_message:.1f} ms; where these processes' CPU is the limit (2 cores) the ratio is "
         f"bounded near {_cpu_bound_ratio(unique, duplicated):.2f} (a hit skips decode, preprocess and the model, but still pays "
         "the S3 GET, hashing, publish and commit)"],
    )]  # fmt: skip


def _cpu_bound_ratio(unique: WorkerRun, duplicated: WorkerRun) -> float:
    def total(run: WorkerRun) -> float:
        return run.cpu_ms_per_message + run.services_cpu_ms_per_message

    return total(unique) / max(total(duplicated), 1e-9)


def _copy_objects(bench: Bench, keys: list[str]) -> list[str]:
    s3, bucket = bench.services.s3, bench.services.bucket
    copies = [f"dup/{key}" for key in keys]
    for key, copy in zip(keys, copies, strict=True):
        s3.copy_object(Bucket=bucket, Key=copy, CopySource={"Bucket": bucket, "Key": key})
    return copies


# -- memory -------------------------------------------------------------------


def memory(bench: Bench) -> list[Row]:
    first, last = bench.sizes.memory_marks
    keys = list(_cycled(bench.corpus_keys(), last))
    topics = Topics.create(bench.services.bootstrap)
    produce_all(bench.services.bootstrap, topics.requests, bench.services.bucket, keys)
    # Every message takes the full path: no dedupe hits even though images repeat.
    with running_worker(bench.env(topics, LABELSTREAM_CACHE__MAX_ENTRIES="0"), "memory") as worker:
        samples: dict[int, int] = {}
        collect_outputs(bench.services.bootstrap, topics, last, timeout_s=600 + last / 5, worker=worker,
                        on_progress=lambda done: samples.setdefault(done, worker.rss_bytes()))
        at_last = worker.rss_bytes()
    at_first = _first_at_or_after(samples, first)
    jitter = _rss_jitter(samples, first)
    growth = at_last / at_first - 1.0
    return [Row(
        "memory", f"RSS {at_last / 2**20:.0f} MiB after {last} msgs", f"RSS {at_first / 2**20:.0f} MiB after {first}",
        None, "growth <= 5%", jitter, _verdict(bench, at_most(growth, 0.05, jitter)),
        [f"worker RSS from /proc, dedupe cache off (cache.max_entries=0); noise = RSS jitter between "
         f"{first} and {int(first * 1.5)} messages"],
        ratio_text=f"{growth * 100:+.1f}%",
    )]  # fmt: skip


def _cycled(keys: list[str], count: int) -> Iterator[str]:
    for index in range(count):
        yield keys[index % len(keys)]


def _first_at_or_after(samples: dict[int, int], mark: int) -> int:
    return samples[min(done for done in samples if done >= mark)]


def _rss_jitter(samples: dict[int, int], mark: int) -> float:
    window = [rss for done, rss in samples.items() if mark <= done <= mark * 1.5]
    return (max(window) - min(window)) / min(window) if window else 0.0


# -- latency ------------------------------------------------------------------


def latency(bench: Bench) -> list[Row]:
    rate = bench.worker().rate / 2
    keys = list(_cycled(bench.corpus_keys(), max(2, int(rate * bench.sizes.latency_seconds))))
    topics = Topics.create(bench.services.bootstrap)
    with running_worker(bench.env(topics), "latency") as worker:
        produce_all(bench.services.bootstrap, topics.requests, bench.services.bucket, keys[:1])
        collect_outputs(bench.services.bootstrap, topics, 1, timeout_s=120, worker=worker)
        sender, sent = _start_paced_send(bench, topics, keys, rate)
        # Read while sending: an output's receive time is when it became readable.
        outputs = collect_outputs(bench.services.bootstrap, topics, len(keys) + 1, timeout_s=300, worker=worker)
        sender.join()
    latencies = sorted((o.received_s - sent[o.request_id]) * 1000 for o in outputs if o.request_id in sent)
    p50, p99 = _percentile(latencies, 50), _percentile(latencies, 99)
    return [Row(
        "latency", f"p50 {p50:.0f} ms, p99 {p99:.0f} ms", f"at {rate:.1f} img/s (half of max)",
        None, "(printed only)", None, "INFO",
        [f"{len(latencies)} requests; from the request's send (its record timestamp) until its label record "
         "is readable on the labels topic (after the broker acknowledged it)"],
    )]  # fmt: skip


def _start_paced_send(
    bench: Bench, topics: Topics, keys: list[str], rate: float
) -> tuple[threading.Thread, dict[str, float]]:
    """A thread sending one request every 1/rate seconds; request id -> send time (epoch seconds)."""
    sent: dict[str, float] = {}
    producer = KafkaProducer(bootstrap_servers=bench.services.bootstrap, acks="all", linger_ms=0)

    def send_all() -> None:
        start = time.monotonic()
        try:
            for index, key in enumerate(keys):
                time.sleep(max(0.0, start + index / rate - time.monotonic()))
                request_id = f"latency-{index}"
                sent[request_id] = time.time()
                value = request_for(bench.services.bucket, key, request_id)
                producer.send(topics.requests, key=request_id.encode(), value=value)
            producer.flush()
        finally:
            producer.close()

    thread = threading.Thread(target=send_all, name="paced-producer", daemon=True)
    thread.start()
    return thread, sent


def _percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    index = min(len(values) - 1, max(0, round(pct / 100 * (len(values) - 1))))
    return values[index]


# -- eval_prompt_iteration ----------------------------------------------------

EVAL_WARMUP_PER_CLASS = 2


def eval_prompt_iteration(bench: Bench) -> list[Row]:
    folder = eval_iteration.textile_folder(bench.sizes.eval_per_class)
    warmup = eval_iteration.textile_folder(EVAL_WARMUP_PER_CLASS)
    pairs = eval_iteration.measure_in_process(folder, warmup, bench.sizes.eval_repeats)
    first = statistics.fmean(p.first.wall_s for p in pairs)
    second = statistics.fmean(p.second.wall_s for p in pairs)
    noise = _combined(relative_standard_error([p.first.wall_s for p in pairs]),
                      relative_standard_error([p.second.wall_s for p in pairs]))
    ratio = _ratio(first, second)
    images = pairs[0].first.n_images
    notes = [
        f"{images} conformal-clip-data textile JPEGs (250x250, {bench.sizes.eval_per_class} per class), tiny model, "
        f"batch {BATCH_SIZE}, CPU; `labelstream eval` via labelstream.cli.main in-process (imports paid by a warm-up "
        f"eval on {EVAL_WARMUP_PER_CLASS * 3} other images); the second run's taxonomy rewords the prompts and adds "
        "a template, so only its text features are computed; each pair from empty embedding and classifier caches",
        "pairs (first / second s): " + ", ".join(f"{p.first.wall_s:.2f} / {p.second.wall_s:.2f}" for p in pairs)
        + "; image side only (encode vs cache load): "
        + ", ".join(f"{p.first.image_s:.2f} / {p.second.image_s:.3f}" for p in pairs),
    ]
    if not bench.quick:
        cli = eval_iteration.measure_cli(folder)
        notes.append(f"as `labelstream eval` subprocesses (interpreter start, imports, model load included): "
                     f"{cli.first.wall_s:.1f} s vs {cli.second.wall_s:.1f} s, ratio {cli.ratio:.1f}")
    return [Row(
        "eval_prompt_iteration", f"changed prompts {second:.2f} s", f"first eval {first:.2f} s", ratio, ">= 10",
        noise, _verdict(bench, at_least(ratio, 10.0, noise)), notes,
    )]  # fmt: skip
