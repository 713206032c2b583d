"""The content-hash dedupe cache: keys, LRU bound, per-taxonomy labels, counters, threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from prometheus_client import REGISTRY

from pipeline.config import Settings
from pipeline.dedupe import DedupeCache, content_key


def vector(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(8).astype(np.float32)


def counter(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def test_key_is_the_sha256_of_the_bytes() -> None:
    assert content_key(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert content_key(b"abc") != content_key(b"abd")


def test_max_entries_is_a_setting_defaulting_to_10000(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().cache.max_entries == 10_000
    monkeypatch.setenv("LABELSTREAM_CACHE__MAX_ENTRIES", "0")
    assert Settings().cache.max_entries == 0


def test_a_stored_image_is_found_with_its_labels_per_taxonomy_version() -> None:
    cache: DedupeCache[list[str]] = DedupeCache(10)
    key = content_key(b"image")
    assert cache.labels_for(key, "v1") is None
    cache.store(key, vector(1), "v1", ["cat"])
    embedding, labels = cache.labels_for(key, "v1")  # type: ignore[misc]
    assert np.array_equal(embedding, vector(1)) and labels == ["cat"]
    # Another taxonomy version: the embedding is reusable, the labels are not there yet.
    embedding, labels = cache.labels_for(key, "v2")  # type: ignore[misc]
    assert np.array_equal(embedding, vector(1)) and labels is None
    cache.store(key, vector(1), "v2", ["feline"])
    entry = cache.lookup(key)
    assert entry is not None and entry.labels == {"v1": ["cat"], "v2": ["feline"]}


def test_cached_embeddings_are_read_only_copies() -> None:
    cache: DedupeCache[str] = DedupeCache(10)
    original = vector(2)
    cache.store("k", original, "v", "x")
    original[:] = 0
    entry = cache.lookup("k")
    assert entry is not None and np.array_equal(entry.embedding, vector(2))
    with pytest.raises(ValueError):
        entry.embedding[0] = 1.0


def test_least_recently_used_entry_is_evicted_at_the_bound() -> None:
    cache: DedupeCache[str] = DedupeCache(2)
    cache.store("a", vector(1), "v", "A")
    cache.store("b", vector(2), "v", "B")
    assert cache.lookup("a") is not None  # "a" is now more recent than "b"
    cache.store("c", vector(3), "v", "C")
    assert len(cache) == 2
    assert cache.lookup("b") is None
    assert cache.lookup("a") is not None and cache.lookup("c") is not None


def test_zero_entries_disables_the_cache() -> None:
    cache: DedupeCache[str] = DedupeCache(0)
    cache.store("a", vector(1), "v", "A")
    assert not cache.enabled and len(cache) == 0
    assert cache.lookup("a") is None
    assert cache.hits == cache.misses == 0 and cache.hit_rate() == 0.0


def test_hits_and_misses_are_counted_locally_and_in_prometheus() -> None:
    hits, misses = counter("labelstream_dedupe_hits_total"), counter("labelstream_dedupe_misses_total")
    cache: DedupeCache[str] = DedupeCache(10)
    assert cache.hit_rate() == 0.0
    cache.lookup("a")
    cache.store("a", vector(1), "v", "A")
    cache.lookup("a")
    cache.labels_for("a", "v")
    cache.lookup("b")
    assert (cache.hits, cache.misses) == (2, 2)
    assert cache.hit_rate() == pytest.approx(0.5)
    assert counter("labelstream_dedupe_hits_total") == hits + 2
    assert counter("labelstream_dedupe_misses_total") == misses + 2
    assert counter("labelstream_dedupe_entries") == 1


def test_concurrent_use_keeps_the_bound_and_the_counts() -> None:
    cache: DedupeCache[int] = DedupeCache(50)
    rounds, threads = 2_000, 4

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(rounds):
            key = str(int(rng.integers(0, 100)))
            if cache.lookup(key) is None:
                cache.store(key, vector(int(key)), "v", int(key))

    workers = [threading.Thread(target=work, args=(seed,)) for seed in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    assert len(cache) == 50
    assert cache.hits + cache.misses == rounds * threads
    for key in list(cache._entries):
        entry = cache.lookup(key)
        assert entry is not None and entry.labels == {"v": int(key)}
