"""The ops server on a real socket: /metrics from prometheus_client, /healthz and /readyz driven by HealthState."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families

from pipeline import metrics
from pipeline.config import HealthSettings, MetricsSettings, load_settings
from pipeline.errors import ConfigError
from pipeline.health import HealthState
from pipeline.metrics_server import OpsServer, start_ops_server


class FakeClock:
    """Injected into HealthState, so stalls are tested without sleeping for minutes."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def health(clock: FakeClock) -> HealthState:
    return HealthState(stall_threshold_s=30.0, max_inference_failures=3, clock=clock)


@pytest.fixture
def server(health: HealthState) -> Iterator[OpsServer]:
    with OpsServer(health, host="127.0.0.1", port=0) as running:
        yield running


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as failing:
        return failing.code, dict(failing.headers), failing.read()


def probe(server: OpsServer, path: str) -> tuple[int, dict[str, Any]]:
    status, headers, body = get(server.url + path)
    assert headers["Content-Type"] == "application/json"
    return status, json.loads(body)


def make_ready(health: HealthState) -> None:
    health.poll_loop_tick()
    health.model_loaded()
    health.classifiers_built()
    health.assignment_changed([("labelstream.requests", 0), ("labelstream.requests", 1)])


def labelstream_metric_names() -> set[str]:
    collectors = [v for v in vars(metrics).values() if isinstance(v, Counter | Gauge | Histogram)]
    return {family.name for collector in collectors for family in collector.describe()}


# -- /metrics ------------------------------------------------------------------------


def test_metrics_exposes_every_labelstream_metric_in_prometheus_text_format(server: OpsServer) -> None:
    metrics.REQUESTS_LABELLED.labels(taxonomy="metrics-server-test").inc(7)
    status, headers, body = get(server.url + "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {family.name: family for family in text_string_to_metric_families(body.decode("utf-8"))}
    assert labelstream_metric_names() <= set(families)
    labelled = {tuple(s.labels.items()): s.value for s in families["labelstream_requests_labelled"].samples
                if s.name.endswith("_total")}
    assert labelled[(("taxonomy", "metrics-server-test"),)] == 7.0


def test_the_issue_metrics_exist_with_their_labels() -> None:
    expected = {
        "labelstream_requests_consumed": ("counter", ()),
        "labelstream_requests_labelled": ("counter", ("taxonomy",)),
        "labelstream_dead_letters": ("counter", ("code", "taxonomy")),
        "labelstream_batch_size": ("histogram", ()),
        "labelstream_stage_seconds": ("histogram", ("stage",)),
        "labelstream_in_flight": ("gauge", ()),
        "labelstream_consumer_lag": ("gauge", ("topic", "partition")),
        "labelstream_model_load_seconds": ("gauge", ()),
        "labelstream_classifier_build_seconds": ("gauge", ("taxonomy",)),
    }
    collectors = {family.name: collector for collector in vars(metrics).values()
                  if isinstance(collector, Counter | Gauge | Histogram) for family in collector.describe()}
    for name, (kind, labels) in expected.items():
        assert collectors[name]._type == kind, name
        assert tuple(collectors[name]._labelnames) == labels, name
    assert metrics.STAGES == ("fetch", "decode", "infer", "publish", "end_to_end")


def test_metrics_honours_an_openmetrics_accept_header(server: OpsServer) -> None:
    status, headers, body = get(server.url + "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


def test_stage_and_lag_helpers_show_up_in_a_scrape(server: OpsServer) -> None:
    before = metrics.STAGE_SECONDS.labels(stage="decode")._sum.get()
    metrics.observe_stage("decode", 0.25)
    metrics.observe_end_to_end(int(time.time() * 1000) - 2000)
    metrics.set_consumer_lag({("metrics-test", 0): 40, ("metrics-test", 1): 2})
    metrics.set_consumer_lag({("metrics-test", 1): 5})
    text = get(server.url + "/metrics")[2].decode("utf-8")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("labelstream_stage_seconds_sum", (("stage", "decode"),))] == pytest.approx(before + 0.25)
    assert samples[("labelstream_stage_seconds_sum", (("stage", "end_to_end"),))] >= 2.0
    # A revoked partition's series disappears instead of freezing at its last value.
    assert ("labelstream_consumer_lag", (("partition", "0"), ("topic", "metrics-test"))) not in samples
    assert samples[("labelstream_consumer_lag", (("partition", "1"), ("topic", "metrics-test")))] == 5.0
    metrics.set_consumer_lag({})


def test_observe_stage_rejects_a_stage_that_dashboards_do_not_know() -> None:
    with pytest.raises(ValueError, match="unknown stage"):
        metrics.observe_stage("prepare", 0.1)


def test_unknown_paths_are_404_and_list_the_real_ones(server: OpsServer) -> None:
    status, body = probe(server, "/nope")
    assert status == 404
    assert body["paths"] == ["/metrics", "/healthz", "/readyz"]


# -- /healthz ------------------------------------------------------------------------


def test_liveness_is_ok_while_starting_and_fails_when_the_poll_loop_stops_turning(
    server: OpsServer, health: HealthState, clock: FakeClock
) -> None:
    status, body = probe(server, "/healthz")
    assert (status, body["poll_loop_started"]) == (200, False)
    health.poll_loop_tick()
    clock.advance(29)
    assert probe(server, "/healthz")[0] == 200
    clock.advance(2)
    status, body = probe(server, "/healthz")
    assert status == 503
    assert body["stalled_stages"] == {"poll": 31.0}
    assert body["reasons"] == ["poll loop has not turned for 31s"]
    health.poll_loop_tick()
    assert probe(server, "/healthz")[0] == 200


def test_a_stage_busy_past_the_threshold_fails_liveness_and_an_idle_one_never_does(
    server: OpsServer, health: HealthState, clock: FakeClock
) -> None:
    health.poll_loop_tick()
    health.stage_busy("infer")
    clock.advance(20)
    health.poll_loop_tick()
    clock.advance(15)
    health.poll_loop_tick()
    status, body = probe(server, "/healthz")
    assert status == 503
    assert body["stalled_stages"] == {"infer": 35.0}
    health.stage_idle("infer")
    clock.advance(25)
    health.poll_loop_tick()
    assert probe(server, "/healthz")[0] == 200


def test_busy_entries_are_per_thread_so_one_finishing_thread_does_not_hide_a_stuck_one(
    health: HealthState, clock: FakeClock
) -> None:
    stuck_started = threading.Event()
    release = threading.Event()

    def stuck_fetch() -> None:
        with health.working("fetch"):
            stuck_started.set()
            release.wait(10)

    thread = threading.Thread(target=stuck_fetch)
    thread.start()
    stuck_started.wait(5)
    with health.working("fetch"):
        clock.advance(40)
    ok, details = health.liveness()
    release.set()
    thread.join(5)
    assert not ok and details["stalled_stages"] == {"fetch": 40.0}
    assert health.liveness().ok


def test_a_heartbeat_counts_as_progress_for_long_running_work(health: HealthState, clock: FakeClock) -> None:
    health.stage_busy("publish", since=clock.now)
    for _ in range(4):
        clock.advance(20)
        health.stage_heartbeat("publish")
    assert health.liveness().ok
    health.stage_stopped("publish")
    clock.advance(100)
    assert health.liveness().ok


# -- /readyz -------------------------------------------------------------------------


def test_readiness_needs_model_classifiers_and_an_assignment(server: OpsServer, health: HealthState) -> None:
    status, body = probe(server, "/readyz")
    assert status == 503
    assert body["reasons"] == ["model not loaded", "classifiers not built", "no partitions assigned"]
    health.model_loaded()
    health.classifiers_built()
    status, body = probe(server, "/readyz")
    assert (status, body["reasons"]) == (503, ["no partitions assigned"])
    health.partitions_added([("labelstream.requests", 2)])
    status, body = probe(server, "/readyz")
    assert status == 200
    assert body["checks"]["assigned_partitions"] == ["labelstream.requests:2"]
    health.partitions_removed([("labelstream.requests", 2)])
    assert probe(server, "/readyz")[0] == 503


def test_readiness_turns_false_after_consecutive_inference_failures_and_recovers(
    server: OpsServer, health: HealthState
) -> None:
    make_ready(health)
    health.inference_failed("boom")
    health.inference_failed("boom")
    assert probe(server, "/readyz")[0] == 200
    health.inference_failed("CUDA error: device-side assert triggered")
    status, body = probe(server, "/readyz")
    assert status == 503
    assert body["reasons"] == ["inference failed 3 times in a row"]
    assert body["checks"]["last_inference_error"] == "CUDA error: device-side assert triggered"
    # Liveness is untouched: the process is up, it just cannot do its job.
    assert probe(server, "/healthz")[0] == 200
    health.inference_succeeded()
    assert probe(server, "/readyz")[0] == 200


def test_a_stalled_worker_is_not_ready_either(server: OpsServer, health: HealthState, clock: FakeClock) -> None:
    make_ready(health)
    clock.advance(31)
    status, body = probe(server, "/readyz")
    assert status == 503
    assert body["live"] is False
    assert body["reasons"] == ["not live: poll loop has not turned for 31s"]


def test_a_stopping_worker_is_not_ready(server: OpsServer, health: HealthState) -> None:
    make_ready(health)
    health.stopping()
    status, body = probe(server, "/readyz")
    assert (status, body["reasons"]) == (503, ["shutting down"])


def test_health_state_survives_concurrent_updates_and_probes(health: HealthState) -> None:
    make_ready(health)
    stop = threading.Event()

    def churn(stage: str) -> None:
        while not stop.is_set():
            with health.working(stage):
                health.stage_heartbeat(stage)
            health.inference_succeeded()
            health.partitions_added([("t", 1)])

    threads = [threading.Thread(target=churn, args=(stage,)) for stage in ("fetch", "decode", "infer")]
    for thread in threads:
        thread.start()
    verdicts = [health.readiness().ok and health.liveness().ok for _ in range(300)]
    stop.set()
    for thread in threads:
        thread.join(5)
    assert all(verdicts)


# -- settings and lifecycle -----------------------------------------------------------


def test_settings_come_from_the_documented_environment_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABELSTREAM_METRICS__PORT", "9555")
    monkeypatch.setenv("LABELSTREAM_METRICS__HOST", "127.0.0.1")
    monkeypatch.setenv("LABELSTREAM_HEALTH__STALL_THRESHOLD_S", "45")
    monkeypatch.setenv("LABELSTREAM_HEALTH__MAX_INFERENCE_FAILURES", "1")
    settings = load_settings()
    assert settings.metrics == MetricsSettings(port=9555, host="127.0.0.1")
    assert settings.health == HealthSettings(stall_threshold_s=45, max_inference_failures=1)
    state = HealthState.from_settings(settings.health)
    assert (state.stall_threshold_s, state.max_inference_failures) == (45, 1)


def test_defaults_are_port_9400_on_all_interfaces() -> None:
    assert MetricsSettings() == MetricsSettings(port=9400, host="0.0.0.0")


def test_port_zero_in_settings_turns_the_server_off(health: HealthState) -> None:
    assert start_ops_server(MetricsSettings(port=0), health) is None


def test_start_ops_server_serves_on_the_configured_port_and_stop_releases_it(health: HealthState) -> None:
    port = free_port()
    server = start_ops_server(MetricsSettings(port=port, host="127.0.0.1"), health)
    assert server is not None and server.port == port
    assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
    server.stop()
    server.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
    again = OpsServer(health, "127.0.0.1", port).start()
    again.stop()


def test_a_taken_port_is_a_config_error(server: OpsServer, health: HealthState) -> None:
    with pytest.raises(ConfigError) as raised:
        OpsServer(health, "127.0.0.1", server.port).start()
    assert raised.value.code == "config.metrics_port"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
