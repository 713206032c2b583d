"""Pure pieces of the HTTP API and the shared engine: lane shares, drops, keys, rate limits, settings."""

from __future__ import annotations

import base64
import hashlib
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydantic import SecretStr

from api.app import encode_vector
from api.auth import KeyStore, bearer_token
from api.rate_limit import RateLimiter, retry_after_header
from pipeline.batcher import LaneBatcher
from pipeline.config import HttpSettings, Settings
from pipeline.errors import ConfigError


@pytest.fixture
def stop() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()


def _filled(batcher: LaneBatcher[str], interactive: int, stream: int) -> LaneBatcher[str]:
    for index in range(interactive):
        batcher.put("interactive", f"h{index}")
    for index in range(stream):
        batcher.put("stream", f"k{index}")
    return batcher


def _kinds(batch: list[str]) -> tuple[int, int]:
    return sum(item.startswith("h") for item in batch), sum(item.startswith("k") for item in batch)


def test_both_lanes_waiting_split_the_batch_by_the_share(stop: threading.Event) -> None:
    batcher = _filled(LaneBatcher(max_size=8, max_wait_ms=0, interactive_share=0.25), interactive=10, stream=10)
    assert _kinds(batcher.next_batch(stop)) == (2, 6)


def test_a_lane_fills_the_slots_the_other_leaves_empty(stop: threading.Event) -> None:
    few_http = _filled(LaneBatcher(max_size=8, max_wait_ms=0, interactive_share=0.5), interactive=1, stream=20)
    assert _kinds(few_http.next_batch(stop)) == (1, 7)
    few_kafka = _filled(LaneBatcher(max_size=8, max_wait_ms=0, interactive_share=0.25), interactive=20, stream=3)
    assert _kinds(few_kafka.next_batch(stop)) == (5, 3)
    only_http = _filled(LaneBatcher(max_size=8, max_wait_ms=0, interactive_share=0.25), interactive=20, stream=0)
    assert _kinds(only_http.next_batch(stop)) == (8, 0)


def test_a_batch_with_interactive_items_is_cut_to_the_interactive_size(stop: threading.Event) -> None:
    capped = _filled(LaneBatcher(max_size=32, max_wait_ms=0, interactive_share=0.5, interactive_max_size=4),
                     interactive=1, stream=40)
    assert _kinds(capped.next_batch(stop)) == (1, 3)
    assert _kinds(capped.next_batch(stop)) == (0, 32), "with no HTTP item waiting, the batch is full size again"
    many_http = _filled(LaneBatcher(max_size=32, max_wait_ms=0, interactive_share=0.25, interactive_max_size=4),
                        interactive=10, stream=40)
    assert _kinds(many_http.next_batch(stop)) == (1, 3), "the share still applies within the smaller batch"
    only_http = _filled(LaneBatcher(max_size=32, max_wait_ms=0, interactive_max_size=4), interactive=10, stream=0)
    assert _kinds(only_http.next_batch(stop)) == (4, 0)


def test_lanes_keep_their_order_and_lose_nothing(stop: threading.Event) -> None:
    batcher = _filled(LaneBatcher(max_size=4, max_wait_ms=0, interactive_share=0.5), interactive=5, stream=7)
    seen: list[str] = []
    while len(seen) < 12:
        seen += batcher.next_batch(stop)
    assert [s for s in seen if s.startswith("h")] == [f"h{i}" for i in range(5)]
    assert [s for s in seen if s.startswith("k")] == [f"k{i}" for i in range(7)]


def test_discarded_items_never_leave_in_a_batch(stop: threading.Event) -> None:
    asked: list[str] = []

    def discard(item: str) -> bool:
        asked.append(item)
        return item == "h1"

    batcher = _filled(LaneBatcher(max_size=8, max_wait_ms=0, discard=discard), interactive=3, stream=1)
    assert sorted(batcher.next_batch(stop)) == ["h0", "h2", "k0"]
    assert sorted(asked) == ["h0", "h1", "h2", "k0"]


def test_a_full_interactive_lane_refuses_at_once_and_all_or_nothing() -> None:
    batcher: LaneBatcher[str] = LaneBatcher(max_size=4, max_wait_ms=0, capacity={"interactive": 2})
    batcher.put("interactive", "h0")
    with pytest.raises(queue.Full):
        batcher.put_all("interactive", ["h1", "h2"])
    assert batcher.depth("interactive") == 1
    batcher.put("interactive", "h1")
    with pytest.raises(queue.Full):
        batcher.put("interactive", "h2")


def test_a_full_stream_lane_blocks_its_putter_until_a_batch_is_taken(stop: threading.Event) -> None:
    batcher: LaneBatcher[str] = LaneBatcher(max_size=1, max_wait_ms=0, capacity={"stream": 1})
    batcher.put("stream", "k0")
    done = threading.Event()
    threading.Thread(target=lambda: (batcher.put("stream", "k1"), done.set()), daemon=True).start()
    assert not done.wait(0.3)
    assert batcher.next_batch(stop) == ["k0"]
    assert done.wait(5)


def test_the_batch_waits_only_while_more_is_coming(stop: threading.Event) -> None:
    coming = threading.Event()
    coming.set()
    batcher: LaneBatcher[str] = LaneBatcher(max_size=8, max_wait_ms=5_000, more_coming=coming.is_set)
    batcher.put("interactive", "h0")
    threading.Timer(0.2, lambda: (batcher.put("stream", "k0"), coming.clear())).start()
    started = time.monotonic()
    assert sorted(batcher.next_batch(stop)) == ["h0", "k0"]
    assert time.monotonic() - started < 2.0


def test_keys_match_in_constant_time_by_digest_and_from_a_file(tmp_path: Path) -> None:
    hashes = tmp_path / "keys"
    hashes.write_text(f"{hashlib.sha256(b'from-file').hexdigest()}  # ci\n")
    store = KeyStore.from_settings(HttpSettings(api_keys=(SecretStr("plain"),), api_key_hashes_file=hashes))
    assert store.identify("plain") == hashlib.sha256(b"plain").hexdigest()[:12]
    assert store.identify("from-file") is not None
    assert store.identify("plain ") is None and store.identify("") is None
    hashes.write_text("not-a-digest\n")
    with pytest.raises(ConfigError, match="line 1"):
        KeyStore.from_settings(HttpSettings(api_key_hashes_file=hashes))


def test_bearer_token_parsing() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer ") is None
    assert bearer_token(None) is None


def test_token_bucket_allows_a_burst_then_paces() -> None:
    now = [0.0]
    limiter = RateLimiter(per_second=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.take("a") for _ in range(3)] == [None, None, None]
    wait = limiter.take("a")
    assert wait == pytest.approx(0.5)
    assert limiter.take("b") is None
    now[0] += 0.5
    assert limiter.take("a") is None
    assert retry_after_header(0.2) == {"Retry-After": "1"} and retry_after_header(2.1) == {"Retry-After": "3"}
    assert RateLimiter(per_second=0.0, burst=1).take("a") is None


def test_base64_vectors_are_little_endian_float32() -> None:
    vector = np.array([1.0, -0.5, 0.25], dtype=np.float32)
    encoded = encode_vector(vector, "base64")
    assert isinstance(encoded, str)
    assert np.array_equal(np.frombuffer(base64.b64decode(encoded), dtype="<f4"), vector)
    assert encode_vector(vector, "float") == [1.0, -0.5, 0.25]


def test_http_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABELSTREAM_HTTP__PORT", "8080")
    monkeypatch.setenv("LABELSTREAM_HTTP__API_KEYS", '["k1", "k2"]')
    monkeypatch.setenv("LABELSTREAM_HTTP__RATE_LIMIT__PER_SECOND", "5")
    settings = Settings()
    assert settings.http.port == 8080
    assert [key.get_secret_value() for key in settings.http.api_keys] == ["k1", "k2"]
    assert settings.http.rate_limit.per_second == 5.0
    assert "k1" not in repr(settings) and "k1" not in settings.model_dump_json()
    assert Settings.model_fields["http"].default.port == 8000
