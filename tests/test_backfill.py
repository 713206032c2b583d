"""`labelstream backfill` against the real broker and S3 server.

Interrupted runs are real `labelstream backfill` subprocesses sent real
signals; the other runs call the CLI's `main` in this process (same code, no
4 s torch import per run). Requests are read back from the topic.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import Any

import boto3
import pytest
import structlog
from botocore.config import Config
from kafka import TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from PIL import Image

from labelstream.backfill import ObjectFilter, TokenBucket, image_suffixes, parse_since
from labelstream.backfill_state import BackfillKey, BackfillState, default_state_path, load_state, save_state
from labelstream.cli import main as cli_main
from labelstream.embedded import free_port
from pipeline.config import ModelSettings
from pipeline.errors import ConfigError
from pipeline.model import resolve_source
from pipeline.object_tags import marker_key
from pipeline.taxonomy import everyday_taxonomy_path, load_taxonomy
from schemas.requests import Request
from tests.conftest import DUMMY_AWS_ENV, TinyModel
from tests.worker_process import read_all, start_worker, wait_for_commits

REPO_ROOT = Path(__file__).resolve().parent.parent
BIG_PREFIX_IMAGES = 2500
PAGE = 1000
SUBPROCESS_TIMEOUT_S = 120
EVERYDAY = "everyday"


def tiny_jpeg() -> bytes:
    buffer = BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, "JPEG")
    return buffer.getvalue()


JPEG = tiny_jpeg()


# -- helpers -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3(s3_server: Any) -> Any:
    """A client with a connection pool big enough for the upload and tagging threads."""
    return boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name=DUMMY_AWS_ENV["AWS_DEFAULT_REGION"],
                        config=Config(max_pool_connections=32))


def upload(s3: Any, bucket: str, keys: list[str]) -> None:
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda key: s3.put_object(Bucket=bucket, Key=key, Body=JPEG), keys))


def tag(s3: Any, bucket: str, keys: list[str], tags: dict[str, str]) -> None:
    tag_set = {"TagSet": [{"Key": k, "Value": v} for k, v in tags.items()]}
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda key: s3.put_object_tagging(Bucket=bucket, Key=key, Tagging=tag_set), keys))


def requested_keys(records: list[ConsumerRecord], bucket: str) -> list[str]:
    """The S3 keys of the requests on the topic, checking each record's shape on the way."""
    keys = []
    for record in records:
        request = Request.model_validate_json(record.value)
        assert request.image.s3 is not None and request.image.s3.bucket == bucket
        assert request.id == f"s3://{bucket}/{request.image.s3.key}" and record.key == request.id.encode()
        assert request.taxonomy == EVERYDAY
        keys.append(request.image.s3.key)
    return keys


@dataclass(frozen=True)
class Outcome:
    code: int
    stdout: str
    stderr: str


@pytest.fixture
def backfill_env(worker_env: Callable[..., dict[str, str]]) -> Callable[..., dict[str, str]]:
    def build(topic: str, **overrides: str) -> dict[str, str]:
        return worker_env(LABELSTREAM_TOPICS__REQUESTS=topic,
                          LABELSTREAM_TAXONOMY__PATH=str(everyday_taxonomy_path()), **overrides)

    return build


@pytest.fixture
def run_backfill(
    backfill_env: Callable[..., dict[str, str]], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[Callable[..., Outcome]]:
    """`labelstream backfill ARGS` in this process, with the test services' settings."""

    def run(topic: str, *args: str, **overrides: str) -> Outcome:
        for name, value in backfill_env(topic, **overrides).items():
            if name.startswith("LABELSTREAM_"):
                monkeypatch.setenv(name, value)
        capsys.readouterr()
        code = cli_main(["backfill", *args])
        captured = capsys.readouterr()
        return Outcome(code, captured.out, captured.err)

    yield run
    # configure_logging cached structlog loggers bound to this test's captured stderr.
    structlog.reset_defaults()


def start_backfill(env: dict[str, str], log_dir: Path, *args: str) -> subprocess.Popen[bytes]:
    with (log_dir / "stdout").open("wb") as out, (log_dir / "stderr").open("wb") as err:
        return subprocess.Popen([sys.executable, "-m", "labelstream.cli", "backfill", *args],
                                cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err)


def wait_for_position(state_path: Path, proc: subprocess.Popen[bytes], past: str, log_dir: Path) -> str:
    """Until the saved position is after `past`; the process must still be running then."""
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"backfill exited {proc.returncode} early:\n{(log_dir / 'stderr').read_text()[-3000:]}"
        position = saved(state_path).get("position")
        if position is not None and position > past:
            return position
        time.sleep(0.02)
    raise AssertionError(f"no position past {past!r} in {state_path} within {SUBPROCESS_TIMEOUT_S}s")


def saved(state_path: Path) -> dict[str, Any]:
    return json.loads(state_path.read_text()) if state_path.exists() else {}


def everyday_version(tiny_model: TinyModel) -> str:
    """What the tag sink writes: the taxonomy's version with the worker's model identity."""
    model = ModelSettings(name=str(tiny_model.config_path), pretrained=str(tiny_model.checkpoint_path))
    return load_taxonomy(everyday_taxonomy_path()).version(resolve_source(model).identity)


# -- end to end ------------------------------------------------------------------------------


def test_interrupted_backfill_resumes_with_every_key_once_and_a_rerun_requests_nothing_new(
    broker: Any, s3: Any, new_bucket: Callable[[], str], new_topic: Callable[..., str],
    backfill_env: Callable[..., dict[str, str]], run_backfill: Callable[..., Outcome],
    tiny_model: TinyModel, tmp_path: Path,
) -> None:
    bucket, topic, state = new_bucket(), new_topic(3), tmp_path / "state.json"
    images = sorted(f"photos/{i % 5}/img-{i:05d}.{'JPG' if i % 9 == 0 else 'jpg'}" for i in range(BIG_PREFIX_IMAGES))
    not_images = ["photos/0/notes.txt", "photos/3/raw.json", "photos/4/"]
    outside = ["other/img-1.jpg", "photosets/img-2.jpg", "aaa.jpg"]
    upload(s3, bucket, images + not_images + outside)
    args = (f"s3://{bucket}/photos/", "--state", str(state))

    proc = start_backfill(backfill_env(topic), tmp_path, *args, "--rate", "300")
    try:
        wait_for_position(state, proc, past=images[PAGE - 1], log_dir=tmp_path)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=SUBPROCESS_TIMEOUT_S) == 128 + signal.SIGINT
    finally:
        proc.kill()
        proc.wait()
    stderr = (tmp_path / "stderr").read_text()
    assert "interrupted by SIGINT" in stderr and "run the same command again to resume" in stderr.lower()
    position = saved(state)["position"]
    assert images[PAGE - 1] < position < images[-1] and not saved(state)["completed"]
    # Everything up to the saved position was acknowledged, and nothing after it was sent.
    first = requested_keys(read_all(broker.bootstrap, topic), bucket)
    assert sorted(first) == [key for key in images if key <= position]

    resumed = run_backfill(topic, *args, "--rate", "0")

    assert resumed.code == 0, resumed.stderr
    assert "complete" in resumed.stdout and saved(state)["completed"]
    counts = Counter(requested_keys(read_all(broker.bootstrap, topic), bucket))
    assert sorted(counts) == images, "missing keys, or non-images / keys outside the prefix requested"
    assert {key: n for key, n in counts.items() if n != 1} == {}

    # What the tag sink leaves on each object it labelled; the rerun starts a new pass and skips them all.
    tag(s3, bucket, images, {marker_key(EVERYDAY): everyday_version(tiny_model)})
    rerun = run_backfill(topic, *args)

    assert rerun.code == 0, rerun.stderr
    assert f"requested 0 to {topic}" in rerun.stdout and f"skipped {len(images)}" in rerun.stdout
    assert len(read_all(broker.bootstrap, topic)) == len(images)


@pytest.mark.timeout(300)
def test_objects_labelled_by_a_worker_with_the_tag_sink_are_not_requested_again(
    broker: Any, s3: Any, new_bucket: Callable[[], str], new_topic: Callable[..., str], unique_id: str,
    backfill_env: Callable[..., dict[str, str]], run_backfill: Callable[..., Outcome], tmp_path: Path,
) -> None:
    bucket, requests = new_bucket(), new_topic(2)
    keys = [f"in/{i}.jpg" for i in range(6)]
    upload(s3, bucket, keys)
    args = (f"s3://{bucket}/in/", "--state", str(tmp_path / "state.json"))
    first = run_backfill(requests, *args)
    assert first.code == 0 and f"requested {len(keys)} to" in first.stdout, first
    records = read_all(broker.bootstrap, requests)
    outputs = {name: new_topic(1) for name in ("LABELS", "EMBEDDINGS", "DLQ", "TAXONOMIES")}
    group = f"backfill-{unique_id}"
    env = backfill_env(requests, LABELSTREAM_KAFKA__GROUP_ID=group, LABELSTREAM_SINKS__TAGS__ENABLED="true",
                       **{f"LABELSTREAM_TOPICS__{name}": topic for name, topic in outputs.items()})
    worker = start_worker(env, tmp_path, "tagger")
    try:
        # The tag sink writes before the offsets are committed: once committed, every object carries its marker.
        wait_for_commits(broker.bootstrap, group, ends_of(records), 180, worker.assert_alive)
        assert worker.stop(60) == 0, worker.tail()
    finally:
        worker.kill()
    labels = [json.loads(r.value) for r in read_all(broker.bootstrap, outputs["LABELS"])]
    assert sorted(label["id"] for label in labels) == sorted(f"s3://{bucket}/{key}" for key in keys)

    rerun = run_backfill(requests, *args)

    assert rerun.code == 0, rerun.stderr
    assert f"requested 0 to {requests}" in rerun.stdout and f"skipped {len(keys)}" in rerun.stdout
    # The version backfill compares is the one the worker labelled with.
    assert f"version {labels[0]['taxonomy']['version']}" in rerun.stdout
    assert len(read_all(broker.bootstrap, requests)) == len(keys)


def ends_of(records: list[ConsumerRecord]) -> dict[TopicPartition, int]:
    ends: dict[TopicPartition, int] = {}
    for record in records:
        tp = TopicPartition(record.topic, record.partition)
        ends[tp] = max(ends.get(tp, 0), record.offset + 1)
    return ends


def test_skip_needs_the_current_version_and_force_requests_labelled_objects_again(
    broker: Any, s3: Any, new_bucket: Callable[[], str], new_topic: Callable[..., str],
    run_backfill: Callable[..., Outcome], tiny_model: TinyModel, tmp_path: Path,
) -> None:
    bucket, topic = new_bucket(), new_topic(1)
    keys = [f"set/{i:03d}.png" for i in range(40)]
    upload(s3, bucket, keys)
    current, stale, other_taxonomy, untagged = keys[:25], keys[25:30], keys[30:35], keys[35:]
    version = everyday_version(tiny_model)
    tag(s3, bucket, current, {"owner": "data-team", marker_key(EVERYDAY): version})
    tag(s3, bucket, stale, {marker_key(EVERYDAY): "0123456789abcdef"})
    tag(s3, bucket, other_taxonomy, {marker_key("moderation"): version})

    plain = run_backfill(topic, f"s3://{bucket}/set/", "--taxonomy", EVERYDAY, "--state", str(tmp_path / "a.json"))

    assert plain.code == 0, plain.stderr
    assert sorted(requested_keys(read_all(broker.bootstrap, topic), bucket)) == sorted(stale + other_taxonomy + untagged)
    assert f"skipped {len(current)}" in plain.stdout

    forced = run_backfill(topic, f"s3://{bucket}/set/", "--force", "--state", str(tmp_path / "b.json"))

    assert forced.code == 0, forced.stderr
    counts = Counter(requested_keys(read_all(broker.bootstrap, topic), bucket))
    assert counts == Counter({key: 1 for key in current} | {key: 2 for key in stale + other_taxonomy + untagged})


def test_since_keeps_only_objects_modified_at_or_after_it(
    broker: Any, s3: Any, new_bucket: Callable[[], str], new_topic: Callable[..., str],
    run_backfill: Callable[..., Outcome], tmp_path: Path,
) -> None:
    bucket, topic = new_bucket(), new_topic(1)
    old, new = [f"d/old-{i}.jpg" for i in range(5)], [f"d/new-{i}.webp" for i in range(5)]
    upload(s3, bucket, old)
    time.sleep(1.5)  # LastModified has one-second precision on some servers
    since = datetime.now(UTC).replace(microsecond=0)
    time.sleep(0.1)
    upload(s3, bucket, new)
    modified = {o["Key"]: o["LastModified"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    assert all(modified[k] < since for k in old) and all(modified[k] >= since for k in new), modified

    result = run_backfill(topic, f"s3://{bucket}/d/", "--since", since.isoformat(), "--state", str(tmp_path / "s.json"))

    assert result.code == 0, result.stderr
    assert sorted(requested_keys(read_all(broker.bootstrap, topic), bucket)) == new


def test_after_a_sigkill_only_keys_after_the_saved_position_are_requested_again(
    broker: Any, s3: Any, new_bucket: Callable[[], str], new_topic: Callable[..., str],
    backfill_env: Callable[..., dict[str, str]], run_backfill: Callable[..., Outcome], tmp_path: Path,
) -> None:
    bucket, topic, state = new_bucket(), new_topic(2), tmp_path / "state.json"
    keys = sorted(f"k/{i:04d}.jpeg" for i in range(600))
    upload(s3, bucket, keys)
    args = (f"s3://{bucket}/k/", "--state", str(state))

    proc = start_backfill(backfill_env(topic), tmp_path, *args, "--rate", "100")
    try:
        wait_for_position(state, proc, past=keys[150], log_dir=tmp_path)
        proc.kill()
        proc.wait(timeout=SUBPROCESS_TIMEOUT_S)
    finally:
        proc.kill()
        proc.wait()
    position = saved(state)["position"]
    before = requested_keys(read_all(broker.bootstrap, topic), bucket)
    assert set(before) >= {key for key in keys if key <= position}, "a saved position ran ahead of the broker's acks"

    resumed = run_backfill(topic, *args, "--rate", "0")

    assert resumed.code == 0, resumed.stderr
    records = read_all(broker.bootstrap, topic)
    counts = Counter(requested_keys(records, bucket))
    assert sorted(counts) == keys
    repeated = {key for key, n in counts.items() if n > 1}
    assert all(key > position for key in repeated), f"keys up to {position} repeated: {sorted(repeated)[:5]}"
    values = {}
    for record in records:
        assert values.setdefault(record.key, record.value) == record.value, "a repeat differs from the first request"


def test_sigterm_stops_gracefully_and_the_resume_neither_skips_nor_repeats(
    broker: Any, s3: Any, new_bucket: Callable[[], str], new_topic: Callable[..., str],
    backfill_env: Callable[..., dict[str, str]], run_backfill: Callable[..., Outcome], tmp_path: Path,
) -> None:
    bucket, topic, state = new_bucket(), new_topic(1), tmp_path / "state.json"
    keys = sorted(f"t/{i:04d}.gif" for i in range(400))
    upload(s3, bucket, keys)
    args = (f"s3://{bucket}/t/", "--state", str(state))

    proc = start_backfill(backfill_env(topic), tmp_path, *args, "--rate", "100")
    try:
        wait_for_position(state, proc, past=keys[0], log_dir=tmp_path)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=SUBPROCESS_TIMEOUT_S) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
    assert "interrupted by SIGTERM" in (tmp_path / "stderr").read_text()
    assert sorted(requested_keys(read_all(broker.bootstrap, topic), bucket)) == [k for k in keys if k <= saved(state)["position"]]

    resumed = run_backfill(topic, *args, "--rate", "0")

    assert resumed.code == 0, resumed.stderr
    assert sorted(requested_keys(read_all(broker.bootstrap, topic), bucket)) == keys


# -- clear errors ----------------------------------------------------------------------------


def test_bad_uri_missing_bucket_and_unknown_taxonomy_exit_2_with_a_message(
    broker: Any, s3: Any, new_bucket: Callable[[], str], new_topic: Callable[..., str],
    run_backfill: Callable[..., Outcome], tmp_path: Path,
) -> None:
    bucket, topic = new_bucket(), new_topic(1)
    upload(s3, bucket, ["a/1.jpg"])
    state = ("--state", str(tmp_path / "state.json"))

    cases = {
        "request.invalid_uri": run_backfill(topic, f"https://{bucket}/a/", *state),
        "s3.bucket_not_found": run_backfill(topic, "s3://no-such-bucket-here/a/", *state),
        "taxonomy.unknown": run_backfill(topic, f"s3://{bucket}/a/", "--taxonomy", "nope", *state),
        "s3.not_found": run_backfill(topic, f"s3://{bucket}/empty/", *state),
    }

    for code, outcome in cases.items():
        assert outcome.code == 2 and f"labelstream backfill: [{code}]" in outcome.stderr, (code, outcome)
        assert "Traceback" not in outcome.stderr
    assert "'nope'" in cases["taxonomy.unknown"].stderr and EVERYDAY in cases["taxonomy.unknown"].stderr
    assert read_all(broker.bootstrap, topic) == []


def test_unreachable_broker_exits_2_naming_it(
    s3: Any, new_bucket: Callable[[], str], run_backfill: Callable[..., Outcome], tmp_path: Path,
) -> None:
    bucket = new_bucket()
    upload(s3, bucket, ["a/1.jpg"])
    nowhere = f"127.0.0.1:{free_port()}"

    outcome = run_backfill("unused", f"s3://{bucket}/a/", "--state", str(tmp_path / "s.json"),
                           LABELSTREAM_KAFKA__BOOTSTRAP_SERVERS=nowhere, LABELSTREAM_KAFKA__REQUEST_TIMEOUT_MS="2000")

    assert outcome.code == 2 and "[kafka.unreachable]" in outcome.stderr and nowhere in outcome.stderr
    assert not (tmp_path / "s.json").exists()


# -- units -----------------------------------------------------------------------------------


class FakeTime:
    """A clock and a stop event whose `wait` advances the clock instead of sleeping."""

    def __init__(self) -> None:
        self.now = 0.0
        self.stop_at: float | None = None

    def clock(self) -> float:
        return self.now

    def wait(self, seconds: float) -> bool:
        self.now += seconds
        return self.stop_at is not None and self.now >= self.stop_at


def test_token_bucket_allows_one_seconds_burst_then_the_rate() -> None:
    fake = FakeTime()
    bucket = TokenBucket(rate=10, clock=fake.clock)

    granted = [bucket.acquire(fake) for _ in range(40)]  # type: ignore[arg-type]

    assert all(granted)
    # 10 at once, then 30 more at 10 a second.
    assert fake.now == pytest.approx(3.0)


def test_token_bucket_gives_up_when_stopped_while_waiting_and_zero_means_unlimited() -> None:
    fake = FakeTime()
    bucket = TokenBucket(rate=1, clock=fake.clock)
    assert bucket.acquire(fake)  # type: ignore[arg-type]
    fake.stop_at = 0.5
    assert not bucket.acquire(fake)  # type: ignore[arg-type]
    unlimited = TokenBucket(rate=0, clock=fake.clock)
    before = fake.now
    assert all(unlimited.acquire(fake) for _ in range(1000))  # type: ignore[arg-type]
    assert fake.now == before


def test_image_filter_follows_allowed_formats_case_insensitively_and_since() -> None:
    since = datetime(2024, 5, 1, tzinfo=UTC)
    accepts = ObjectFilter(image_suffixes(("JPEG", "PNG")), since).accepts
    new, old = datetime(2024, 5, 1, tzinfo=UTC), datetime(2024, 4, 30, 23, 59, tzinfo=UTC)

    assert accepts({"Key": "a/B.JPEG", "LastModified": new}) and accepts({"Key": "x.png", "LastModified": new})
    assert not accepts({"Key": "a/b.jpg", "LastModified": old})
    assert not any(accepts({"Key": key, "LastModified": new}) for key in ("c.webp", "d.txt", "e/", "jpg", "f.jpg.json"))
    assert {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"} <= image_suffixes(
        ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"))


def test_since_parses_dates_and_times_as_utc_unless_zoned() -> None:
    assert parse_since("2024-05-01") == datetime(2024, 5, 1, tzinfo=UTC)
    assert parse_since("2024-05-01T12:30:00Z") == datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
    assert parse_since("2024-05-01T14:30:00+02:00") == datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
    with pytest.raises(ValueError, match="expected a date"):
        parse_since("last tuesday")


KEY = BackfillKey("bucket", "photos/", EVERYDAY, "abc123", None)


def test_state_round_trips_and_a_completed_state_starts_a_new_pass(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "state.json"
    assert load_state(path, KEY) == BackfillState(key=KEY)
    progressed = BackfillState(key=KEY).advanced("photos/b.jpg", listed=3, requested=1, skipped=1, ignored=1)

    save_state(path, progressed)

    loaded = load_state(path, KEY)
    assert (loaded.position, loaded.listed, loaded.requested, loaded.skipped, loaded.ignored) == ("photos/b.jpg", 3, 1, 1, 1)
    assert [p.name for p in path.parent.iterdir()] == ["state.json"], "a temporary file was left behind"
    save_state(path, BackfillState(key=KEY, position="photos/z.jpg", listed=9, completed=True))
    assert load_state(path, KEY) == BackfillState(key=KEY)


def test_state_of_another_backfill_or_garbage_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    save_state(path, BackfillState(key=KEY, position="photos/a.jpg"))
    other = BackfillKey("bucket", "photos/", EVERYDAY, "def456", None)

    with pytest.raises(ConfigError, match="belongs to another backfill"):
        load_state(path, other)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable"):
        load_state(path, KEY)


def test_default_state_path_is_per_backfill_under_the_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    other = BackfillKey("bucket", "photos/", EVERYDAY, "abc123", "2024-05-01T00:00:00+00:00")

    assert default_state_path(KEY).parent == tmp_path / "labelstream" / "backfill"
    assert default_state_path(KEY).name.startswith("bucket-")
    assert default_state_path(KEY) != default_state_path(other)


def test_readme_example_config_loads_and_its_backfill_commands_parse(tmp_path: Path) -> None:
    from labelstream.cli import _parser
    from pipeline.config import load_settings

    section = (REPO_ROOT / "README.md").read_text().split("\n## Event-driven ingestion\n", 1)[1].split("\n## ", 1)[0]
    config = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "ingest.yaml").write_text(config)
    settings = load_settings(tmp_path / "ingest.yaml")
    assert settings.sinks.tags.enabled and settings.taxonomy.path is not None and settings.taxonomy.path.name == "everyday.yaml"
    commands = [line.split("#", 1)[0].split() for line in section.splitlines() if line.startswith("labelstream backfill ")]
    assert len(commands) >= 4
    for command in commands:
        args = _parser().parse_args(command[1:])
        assert args.command == "backfill" and args.uri.startswith("s3://") and args.config == Path("ingest.yaml")


def test_an_unwritable_state_path_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")

    with pytest.raises(ConfigError, match="cannot write"):
        save_state(blocker / "state.json", BackfillState(key=KEY))
