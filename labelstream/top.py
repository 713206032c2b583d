"""`labelstream top`: a refreshing terminal view of a running worker's metrics endpoint.

Each frame compares two scrapes of /metrics: counters become rates over the
interval between them, and latency percentiles come from the histogram
buckets that filled during that interval (all-time when none did). /healthz
and /readyz add the probe verdicts. Plain ANSI: clear the screen, redraw.
"""

from __future__ import annotations

import json
import math
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, TextIO

from prometheus_client.parser import text_string_to_metric_families

from pipeline.metrics import STAGES

CLEAR_SCREEN = "\x1b[H\x1b[2J"
DEFAULT_URL = "http://127.0.0.1:9400"

Labels = dict[str, str]


@dataclass(frozen=True)
class Snapshot:
    """One scrape: every sample by name, plus the probe answers (None when unavailable)."""

    at: float
    samples: dict[str, list[tuple[Labels, float]]]
    live: dict[str, Any] | None = None
    ready: dict[str, Any] | None = None

    def total(self, name: str) -> float:
        return sum(value for _labels, value in self.samples.get(name, []))

    def by_label(self, name: str, label: str) -> dict[str, float]:
        grouped: dict[str, float] = defaultdict(float)
        for labels, value in self.samples.get(name, []):
            grouped[labels.get(label, "")] += value
        return dict(grouped)

    def has(self, name: str) -> bool:
        return bool(self.samples.get(name))


@dataclass(frozen=True)
class Histogram:
    """Cumulative bucket counts (upper bound -> count), sum and count of one series."""

    buckets: dict[float, float] = field(default_factory=dict)
    sum: float = 0.0
    count: float = 0.0

    def minus(self, earlier: Histogram) -> Histogram:
        buckets = {le: n - earlier.buckets.get(le, 0.0) for le, n in self.buckets.items()}
        return Histogram(buckets, self.sum - earlier.sum, self.count - earlier.count)

    def quantile(self, q: float) -> float | None:
        """Like PromQL's histogram_quantile: linear within the bucket that holds the rank."""
        if self.count <= 0:
            return None
        rank, lower, below = q * self.count, 0.0, 0.0
        for upper in sorted(self.buckets):
            if self.buckets[upper] >= rank:
                if math.isinf(upper):
                    return lower
                share = (rank - below) / max(self.buckets[upper] - below, 1e-12)
                return lower + (upper - lower) * share
            lower, below = upper, self.buckets[upper]
        return lower

    def mean(self) -> float | None:
        return self.sum / self.count if self.count > 0 else None


# -- scraping --------------------------------------------------------------------


def base_url(url: str) -> str:
    """Accept the worker's base URL or its /metrics URL."""
    trimmed = url.rstrip("/")
    return trimmed[: -len("/metrics")] if trimmed.endswith("/metrics") else trimmed


def parse_samples(text: str) -> dict[str, list[tuple[Labels, float]]]:
    samples: dict[str, list[tuple[Labels, float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name].append((dict(sample.labels), float(sample.value)))
    return dict(samples)


def scrape(url: str, timeout_s: float = 5.0) -> Snapshot:
    """GET /metrics (required) and the two probes (best effort)."""
    root = base_url(url)
    with urllib.request.urlopen(f"{root}/metrics", timeout=timeout_s) as response:
        text = response.read().decode("utf-8")
    return Snapshot(time.monotonic(), parse_samples(text), _probe(f"{root}/healthz", timeout_s),
                    _probe(f"{root}/readyz", timeout_s))


def _probe(url: str, timeout_s: float) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            body = response.read()
    except urllib.error.HTTPError as failing:
        # 503 is a probe's "no", and its body says why.
        body = failing.read()
    except (urllib.error.URLError, OSError):
        return None
    try:
        details = json.loads(body)
    except ValueError:
        return None
    return details if isinstance(details, dict) else None


def histograms(snapshot: Snapshot, name: str, label: str) -> dict[str, Histogram]:
    """Every series of histogram `name`, keyed by the value of `label` ('' when unlabelled)."""
    buckets: dict[str, dict[float, float]] = defaultdict(dict)
    for labels, value in snapshot.samples.get(f"{name}_bucket", []):
        buckets[labels.get(label, "")][float(labels["le"])] = value
    sums = snapshot.by_label(f"{name}_sum", label)
    counts = snapshot.by_label(f"{name}_count", label)
    return {key: Histogram(b, sums.get(key, 0.0), counts.get(key, 0.0)) for key, b in buckets.items()}


# -- what a frame shows ------------------------------------------------------------


def rate(current: float, previous: float | None, seconds: float) -> float | None:
    if previous is None or seconds <= 0:
        return None
    # A counter that went down means the worker restarted: count from zero.
    delta = current - previous if current >= previous else current
    return delta / seconds


def dead_letter_metric(snapshot: Snapshot) -> str:
    """labelstream_dead_letters_total when the worker exports it, else the older failure counter."""
    preferred = "labelstream_dead_letters_total"
    return preferred if snapshot.has(preferred) else "labelstream_requests_failed_total"


def render_frame(current: Snapshot, previous: Snapshot | None, url: str, interval_s: float) -> str:
    lines = [f"labelstream top  {base_url(url)}  {time.strftime('%H:%M:%S')}  (every {interval_s:g}s; Ctrl-C quits)"]
    lines += _health_lines(current)
    lines += [""] + _throughput_lines(current, previous)
    lines += [""] + _lag_lines(current)
    lines += [""] + _stage_lines(current, previous)
    lines += [""] + _dead_letter_lines(current, previous)
    return "\n".join(lines) + "\n"


def _health_lines(snapshot: Snapshot) -> list[str]:
    return [f"health   live {_verdict(snapshot.live)}   ready {_verdict(snapshot.ready)}"]


def _verdict(details: dict[str, Any] | None) -> str:
    if details is None:
        return "n/a"
    if details.get("status") == "ok":
        return "OK"
    return "FAIL (" + "; ".join(str(r) for r in details.get("reasons", [])) + ")"


def _throughput_lines(current: Snapshot, previous: Snapshot | None) -> list[str]:
    seconds = current.at - previous.at if previous else 0.0
    dead_name = dead_letter_metric(current)
    names = {"consumed": "labelstream_requests_consumed_total", "labelled": "labelstream_requests_labelled_total",
             "dead-lettered": dead_name}
    totals = {key: current.total(name) for key, name in names.items()}
    rates = {key: rate(totals[key], previous.total(names[key]) if previous else None, seconds) for key in names}
    batch, _over = _window(histograms(current, "labelstream_batch_size", "").get(""),
                           _earlier(previous, "labelstream_batch_size", "", ""))
    return [
        "throughput   " + "   ".join(f"{key} {_per_second(r)}" for key, r in rates.items()),
        "totals       " + "   ".join(f"{key} {totals[key]:.0f}" for key in names),
        f"in flight    {current.total('labelstream_in_flight'):.0f}   "
        f"batch size mean {_number(batch.mean() if batch else None)}   "
        f"p99 {_number(batch.quantile(0.99) if batch else None)}",
    ]


def _per_second(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}/s"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _lag_lines(snapshot: Snapshot) -> list[str]:
    series = snapshot.samples.get("labelstream_consumer_lag", [])
    rows = sorted(series, key=lambda item: (item[0].get("topic", ""), int(item[0].get("partition", "0") or 0)))
    lines = [f"consumer lag (records)   total {sum(v for _l, v in rows):.0f}"]
    lines += [f"  {labels.get('topic', '?')}:{labels.get('partition', '?'):<6} {value:>10.0f}" for labels, value in rows]
    return lines if rows else lines + ["  (no partitions assigned)"]


def _stage_lines(current: Snapshot, previous: Snapshot | None) -> list[str]:
    now = histograms(current, "labelstream_stage_seconds", "stage")
    lines = [f"stage latency (ms)  {'count':>8} {'p50':>9} {'p99':>9} {'mean':>9}  over"]
    for stage in [*STAGES, *sorted(set(now) - set(STAGES))]:
        window, over = _window(now.get(stage), _earlier(previous, "labelstream_stage_seconds", "stage", stage))
        lines.append(f"  {stage:<17} {_count(window):>8} {_ms(window, 0.5):>9} {_ms(window, 0.99):>9} "
                     f"{_mean_ms(window):>9}  {over}")
    return lines


def _earlier(previous: Snapshot | None, name: str, label: str, key: str) -> Histogram | None:
    """The series in the previous scrape; empty if it did not exist yet (its first observations are new)."""
    if previous is None:
        return None
    return histograms(previous, name, label).get(key, Histogram())


def _window(current: Histogram | None, previous: Histogram | None) -> tuple[Histogram | None, str]:
    """What filled during the interval; all-time when nothing did (or nothing to compare with)."""
    if current is None or current.count <= 0:
        return current, ""
    if previous is not None and current.count >= previous.count:
        delta = current.minus(previous)
        if delta.count > 0:
            return delta, "interval"
    return current, "all time"


def _count(histogram: Histogram | None) -> str:
    return "-" if histogram is None else f"{histogram.count:.0f}"


def _ms(histogram: Histogram | None, q: float) -> str:
    value = histogram.quantile(q) if histogram else None
    return "-" if value is None else f"{value * 1000:.1f}"


def _mean_ms(histogram: Histogram | None) -> str:
    value = histogram.mean() if histogram else None
    return "-" if value is None else f"{value * 1000:.1f}"


def _dead_letter_lines(current: Snapshot, previous: Snapshot | None) -> list[str]:
    name = dead_letter_metric(current)
    seconds = current.at - previous.at if previous else 0.0
    now = current.by_label(name, "code")
    before = previous.by_label(name, "code") if previous else {}
    lines = ["dead letters by code       rate      total"]
    for code in sorted(now, key=lambda c: -now[c]):
        per_second = rate(now[code], before.get(code, 0.0) if previous else None, seconds)
        lines.append(f"  {code:<22} {_per_second(per_second):>8} {now[code]:>10.0f}")
    return lines if now else lines + ["  (none)"]


# -- the command ---------------------------------------------------------------------


def run_top(url: str = DEFAULT_URL, interval_s: float = 2.0, once: bool = False, out: TextIO = sys.stdout) -> int:
    """`--once`: scrape twice, `interval_s` apart, print one frame. Otherwise redraw until Ctrl-C."""
    try:
        return _print_once(url, interval_s, out) if once else _refresh_forever(url, interval_s, out)
    except KeyboardInterrupt:
        return 0


def _print_once(url: str, interval_s: float, out: TextIO) -> int:
    try:
        first = scrape(url)
        time.sleep(interval_s)
        second = scrape(url)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"labelstream top: cannot read {base_url(url)}/metrics: {exc}", file=sys.stderr)
        return 1
    out.write(render_frame(second, first, url, interval_s))
    out.flush()
    return 0


def _refresh_forever(url: str, interval_s: float, out: TextIO) -> int:
    previous: Snapshot | None = None
    while True:
        try:
            current = scrape(url)
            frame = render_frame(current, previous, url, interval_s)
            previous = current
        except (urllib.error.URLError, OSError, ValueError) as exc:
            frame = f"labelstream top  {base_url(url)}  {time.strftime('%H:%M:%S')}\ncannot read metrics: {exc}\nretrying every {interval_s:g}s\n"
        out.write(CLEAR_SCREEN + frame)
        out.flush()
        time.sleep(interval_s)
