"""`labelstream top` against a real metrics server: one frame with --once, and a live view inside tmux."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from labelstream.top import Histogram, Snapshot, base_url, histograms, parse_samples, render_frame
from pipeline import metrics
from pipeline.health import HealthState
from pipeline.metrics_server import OpsServer
from tests.terminal_screen import TmuxRunner, private_tmux, wait_for_pane

REPO_ROOT = Path(__file__).resolve().parent.parent
TOPIC = "top-test.requests"


@pytest.fixture
def health() -> HealthState:
    state = HealthState(stall_threshold_s=600, max_inference_failures=2)
    state.poll_loop_tick()
    state.model_loaded()
    state.classifiers_built()
    state.assignment_changed([(TOPIC, 0), (TOPIC, 1), (TOPIC, 10)])
    return state


@pytest.fixture
def server(health: HealthState) -> Iterator[OpsServer]:
    with OpsServer(health, host="127.0.0.1", port=0) as running:
        yield running
    metrics.set_consumer_lag({})


def top_command(url: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "labelstream.cli", "top", "--url", url, *extra]


def consumed_total() -> float:
    return REGISTRY.get_sample_value("labelstream_requests_consumed_total") or 0.0


def dead_letter_total(code: str) -> float:
    return sum(REGISTRY.get_sample_value("labelstream_dead_letters_total", {"code": code, "taxonomy": t}) or 0.0
               for t in ("", "top-test"))


# -- pure parts: exact numbers ----------------------------------------------------------


def snapshot(at: float, text: str) -> Snapshot:
    return Snapshot(at, parse_samples(text), {"status": "ok", "reasons": []},
                    {"status": "failing", "reasons": ["no partitions assigned"]})


EXPOSITION = """\
# TYPE labelstream_requests_consumed_total counter
labelstream_requests_consumed_total {consumed}
# TYPE labelstream_requests_labelled_total counter
labelstream_requests_labelled_total{{taxonomy="everyday"}} {labelled}
# TYPE labelstream_dead_letters_total counter
labelstream_dead_letters_total{{code="image.invalid",taxonomy=""}} {dead}
# TYPE labelstream_in_flight gauge
labelstream_in_flight 12
# TYPE labelstream_consumer_lag gauge
labelstream_consumer_lag{{partition="2",topic="req"}} 30
labelstream_consumer_lag{{partition="0",topic="req"}} 70
# TYPE labelstream_stage_seconds histogram
labelstream_stage_seconds_bucket{{stage="infer",le="0.1"}} {fast}
labelstream_stage_seconds_bucket{{stage="infer",le="1.0"}} {slow}
labelstream_stage_seconds_bucket{{stage="infer",le="+Inf"}} {slow}
labelstream_stage_seconds_sum{{stage="infer"}} {infer_sum}
labelstream_stage_seconds_count{{stage="infer"}} {slow}
"""


def test_a_frame_turns_two_scrapes_into_rates_lag_and_interval_percentiles() -> None:
    first = snapshot(100.0, EXPOSITION.format(consumed=1000, labelled=900, dead=100, fast=50, slow=100, infer_sum=20))
    # 10 s later: +250 consumed, +240 labelled, +10 dead; 100 new infer items, all under 100 ms.
    second = snapshot(110.0, EXPOSITION.format(consumed=1250, labelled=1140, dead=110, fast=150, slow=200,
                                               infer_sum=25))
    frame = render_frame(second, first, "http://w:9400/metrics", 10)
    assert "throughput   consumed 25.0/s   labelled 24.0/s   dead-lettered 1.0/s" in frame
    assert "totals       consumed 1250   labelled 1140   dead-lettered 110" in frame
    assert "in flight    12" in frame
    assert "consumer lag (records)   total 100" in frame
    assert frame.index("req:0") < frame.index("req:2")
    # p50 of the interval's 100 items: rank 50 of 100 in the (0, 0.1] bucket -> 50 ms.
    infer_row = next(line for line in frame.splitlines() if line.strip().startswith("infer"))
    assert infer_row.split() == ["infer", "100", "50.0", "99.0", "50.0", "interval"]
    assert "image.invalid" in frame and "1.0/s" in frame
    assert "health   live OK   ready FAIL (no partitions assigned)" in frame
    assert frame.startswith("labelstream top  http://w:9400  ")


def test_a_counter_reset_reads_as_a_restart_not_a_negative_rate() -> None:
    first = snapshot(0.0, EXPOSITION.format(consumed=5000, labelled=0, dead=0, fast=0, slow=0, infer_sum=0))
    second = snapshot(2.0, EXPOSITION.format(consumed=40, labelled=0, dead=0, fast=0, slow=0, infer_sum=0))
    assert "consumed 20.0/s" in render_frame(second, first, "http://w:9400", 2)


def test_histogram_quantiles_follow_promql_interpolation() -> None:
    histogram = Histogram({0.1: 10, 0.5: 30, 1.0: 40, float("inf"): 40}, sum=12.0, count=40)
    assert histogram.quantile(0.25) == pytest.approx(0.1)
    assert histogram.quantile(0.5) == pytest.approx(0.1 + 0.4 * (20 - 10) / 20)
    assert histogram.quantile(0.99) == pytest.approx(0.5 + 0.5 * (39.6 - 30) / 10)
    beyond = Histogram({0.1: 1, float("inf"): 10}, sum=50, count=10)
    assert beyond.quantile(0.99) == pytest.approx(0.1)
    assert Histogram().quantile(0.5) is None


def test_base_url_accepts_the_metrics_url_too() -> None:
    assert base_url("http://h:9400/metrics") == base_url("http://h:9400/") == "http://h:9400"


def test_histograms_group_real_exposition_by_label() -> None:
    text = EXPOSITION.format(consumed=1, labelled=1, dead=1, fast=3, slow=4, infer_sum=1.5)
    infer = histograms(Snapshot(0, parse_samples(text)), "labelstream_stage_seconds", "stage")["infer"]
    assert (infer.count, infer.sum, infer.buckets[0.1]) == (4, 1.5, 3)


# -- the command against a live server ---------------------------------------------------


def test_top_once_prints_one_frame_from_a_running_server(server: OpsServer) -> None:
    metrics.REQUESTS_CONSUMED.inc(17)
    metrics.REQUESTS_LABELLED.labels(taxonomy="top-test").inc(15)
    metrics.DEAD_LETTERS.labels(code="top.once_test", taxonomy="top-test").inc(2)
    metrics.set_consumer_lag({(TOPIC, 0): 42, (TOPIC, 1): 0, (TOPIC, 10): 8})
    metrics.observe_stage("publish", 0.03)
    expected_consumed = consumed_total()
    result = subprocess.run(top_command(server.url, "--once", "--interval", "0.2"), capture_output=True, text=True,
                            timeout=60, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    frame = result.stdout
    assert "\x1b[2J" not in frame
    assert f"consumed {expected_consumed:.0f}" in frame
    assert re.search(rf"{re.escape(TOPIC)}:0\s+42\b", frame)
    assert re.search(rf"{re.escape(TOPIC)}:10\s+8\b", frame)
    assert re.search(r"top\.once_test\s+0\.0/s\s+2\b", frame)
    assert re.search(r"^\s+publish\s+\d+", frame, re.MULTILINE)
    assert "ready OK" in frame


def test_top_once_fails_cleanly_when_nothing_listens() -> None:
    result = subprocess.run(top_command("http://127.0.0.1:9", "--once", "--interval", "0"), capture_output=True,
                            text=True, timeout=60, cwd=REPO_ROOT)
    assert result.returncode == 1
    assert "cannot read http://127.0.0.1:9/metrics" in result.stderr


@pytest.fixture
def tmux() -> Iterator[TmuxRunner]:
    with private_tmux("labelstream-top") as run:
        yield run


def test_top_refreshes_live_in_a_terminal(server: OpsServer, health: HealthState, tmux: Callable[..., str]) -> None:
    metrics.set_consumer_lag({(TOPIC, 0): 42, (TOPIC, 1): 3})
    # Keep the pane open after an unexpected exit, so a failure shows the traceback.
    command = shlex.join(top_command(server.url, "--interval", "0.3")) + "; sleep 60"
    tmux("new-session", "-d", "-s", "top", "-x", "120", "-y", "50", "-c", str(REPO_ROOT), command)
    wait_for_pane(tmux, rf"{re.escape(TOPIC)}:0\s+42$")
    assert "ready OK" in wait_for_pane(tmux, r"ready OK")

    stop = threading.Event()

    def consume_steadily() -> None:
        while not stop.is_set():
            metrics.REQUESTS_CONSUMED.inc(10)
            metrics.observe_stage("fetch", 0.004)
            time.sleep(0.05)

    feeder = threading.Thread(target=consume_steadily, daemon=True)
    feeder.start()
    try:
        metrics.set_consumer_lag({(TOPIC, 0): 7, (TOPIC, 1): 3})
        health.inference_failed("model raised")
        health.inference_failed("model raised")
        screen = wait_for_pane(tmux, rf"{re.escape(TOPIC)}:0\s+7$")
        screen = wait_for_pane(tmux, r"consumed [1-9]\d*\.\d/s")
        screen = wait_for_pane(tmux, r"ready FAIL \(inference failed 2 times in a row\)")
    finally:
        stop.set()
        feeder.join(5)
    assert "consumer lag (records)   total 10" in screen
    assert re.search(r"^\s+fetch\s+\d+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+interval", screen, re.MULTILINE), screen
    # Redrawn in place: one frame on screen, not a scrolling log of frames.
    assert screen.count("labelstream top  ") == 1
