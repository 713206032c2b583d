"""Configuration (env over YAML over defaults, typos fail loudly, secrets stay secret) and message schemas."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from pydantic import SecretStr, ValidationError

from pipeline.config import Settings, load_settings
from pipeline.errors import ConfigError
from schemas import MESSAGE_TYPES, EmbeddingRecord, ModelRef, Request

YAML_CONFIG = """\
kafka:
  bootstrap_servers: yaml-broker:9092
  group_id: from-yaml
batch:
  max_size: 8
  max_wait_ms: 25
topics:
  requests: yaml.requests
model:
  precision: bf16
"""
PASSWORD = "hunter2-very-secret"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Settings read the process environment; start every test without LABELSTREAM_ variables."""
    for name in list(os.environ):
        if name.startswith("LABELSTREAM_"):
            monkeypatch.delenv(name)
    yield


@pytest.fixture
def yaml_file(tmp_path: Path) -> Path:
    path = tmp_path / "labelstream.yaml"
    path.write_text(YAML_CONFIG)
    return path


def _config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


# --- sources and precedence ------------------------------------------------------------


def test_defaults_without_a_file() -> None:
    settings = load_settings()
    assert settings.kafka.bootstrap_servers == "localhost:9092"
    assert settings.batch.max_size == 32
    assert settings.model.precision == "fp32"


def test_yaml_overrides_defaults(yaml_file: Path) -> None:
    settings = load_settings(yaml_file)
    assert settings.kafka.bootstrap_servers == "yaml-broker:9092"
    assert settings.kafka.group_id == "from-yaml"
    assert settings.batch.max_size == 8
    assert settings.topics.requests == "yaml.requests"
    assert settings.model.precision == "bf16"
    # Untouched keys of a section given in the file keep their defaults.
    assert settings.kafka.client_id == "labelstream"
    assert settings.topics.labels == "labelstream.labels"


def test_environment_overrides_yaml_for_nested_keys(yaml_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABELSTREAM_KAFKA__BOOTSTRAP_SERVERS", "env-broker:9093")
    monkeypatch.setenv("LABELSTREAM_BATCH__MAX_SIZE", "64")
    monkeypatch.setenv("LABELSTREAM_TOPICS__REQUESTS", "env.requests")
    monkeypatch.setenv("LABELSTREAM_MODEL__PRECISION", "fp16")

    settings = load_settings(yaml_file)

    assert settings.kafka.bootstrap_servers == "env-broker:9093"
    assert settings.batch.max_size == 64
    assert settings.topics.requests == "env.requests"
    assert settings.model.precision == "fp16"
    # A sibling set only in the file survives the environment's override of the section.
    assert settings.kafka.group_id == "from-yaml"
    assert settings.batch.max_wait_ms == 25


def test_environment_without_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABELSTREAM_BATCH__MAX_SIZE", "3")
    monkeypatch.setenv("LABELSTREAM_S3__ALLOWED_BUCKETS", '["photos", "uploads"]')
    settings = load_settings()
    assert settings.batch.max_size == 3
    assert settings.s3.allowed_buckets == ("photos", "uploads")


# --- errors name the field ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "field"),
    [
        ("LABELSTREAM_BATCH__MAX_SIZE", "0", "batch.max_size"),
        ("LABELSTREAM_BATCH__MAX_SIZE", "lots", "batch.max_size"),
        ("LABELSTREAM_MODEL__PRECISION", "fp64", "model.precision"),
        ("LABELSTREAM_KAFKA__AUTO_OFFSET_RESET", "middle", "kafka.auto_offset_reset"),
        ("LABELSTREAM_KAFKA__SESSION_TIMEOUT_MS", "-1", "kafka.session_timeout_ms"),
        ("LABELSTREAM_KAFKA__BOOTSTRAPSERVERS", "typo:9092", "kafka.bootstrapservers"),
    ],
)
def test_bad_environment_values_name_the_field(monkeypatch: pytest.MonkeyPatch, variable: str, value: str, field: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert f"'{field}'" in str(caught.value)
    assert caught.value.code == "config.invalid"
    assert caught.value.stage == "config"


def test_unknown_top_level_environment_variable_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # A single underscore instead of `__` is the classic typo; it must not be silently ignored.
    monkeypatch.setenv("LABELSTREAM_KAFKA_BOOTSTRAP_SERVERS", "typo:9092")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "kafka_bootstrap_servers" in str(caught.value).lower()


def test_unknown_yaml_keys_name_the_file_and_every_field(tmp_path: Path) -> None:
    path = _config_file(tmp_path, "kafak:\n  group_id: x\nbatch:\n  max_size: 8\n  maxwait: 3\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    message = str(caught.value)
    assert str(path) in message
    assert "'kafak'" in message and "'batch.maxwait'" in message


def test_bad_yaml_value_names_the_field(tmp_path: Path) -> None:
    path = _config_file(tmp_path, "batch:\n  max_size: -4\n")
    with pytest.raises(ConfigError, match="batch.max_size"):
        load_settings(path)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "absent.yaml")


def test_malformed_yaml_config_is_a_config_error(tmp_path: Path) -> None:
    path = _config_file(tmp_path, "batch: [\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert str(path) in str(caught.value)


def test_non_mapping_yaml_config_is_a_config_error(tmp_path: Path) -> None:
    path = _config_file(tmp_path, "- kafka\n- batch\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert str(path) in str(caught.value)


def test_empty_yaml_config_means_defaults(tmp_path: Path) -> None:
    assert load_settings(_config_file(tmp_path, "")).batch.max_size == 32


# --- secrets and immutability --------------------------------------------------------------


def test_sasl_password_never_leaks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABELSTREAM_KAFKA__SASL_PASSWORD", PASSWORD)
    settings = load_settings()

    assert isinstance(settings.kafka.sasl_password, SecretStr)
    assert settings.kafka.sasl_password.get_secret_value() == PASSWORD
    for rendering in (
        json.dumps(settings.model_dump(mode="json")),
        settings.model_dump_json(),
        repr(settings),
        str(settings),
        repr(settings.kafka),
        str(settings.model_dump()),
    ):
        assert PASSWORD not in rendering


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(ValidationError):
        settings.batch = settings.batch  # type: ignore[misc]
    with pytest.raises(ValidationError):
        settings.batch.max_size = 1  # type: ignore[misc]
    with pytest.raises(ValidationError):
        settings.kafka.bootstrap_servers = "elsewhere:9092"  # type: ignore[misc]


def test_settings_class_rejects_unknown_init_keys() -> None:
    with pytest.raises(ValidationError):
        Settings(bogus=1)  # type: ignore[call-arg]


# --- requests -------------------------------------------------------------------------------------


GOOD_REQUESTS = [
    {"id": "a", "image": {"s3": {"bucket": "photos", "key": "2024/cat.jpg"}}},
    {"id": "b", "image": {"s3": {"bucket": "photos", "key": "cat.jpg", "version_id": "3"}}, "taxonomy": "everyday"},
    {"id": "c", "image": {"url": "https://example.com/cat.jpg"}, "metadata": {"user": 7, "tags": ["x"]}},
    {"id": "d", "image": {"base64": base64.b64encode(b"\xff\xd8\xff" * 10).decode()}},
    {"id": "x" * 256, "image": {"url": "http://example.com/a.png"}},
]


@pytest.mark.parametrize("payload", GOOD_REQUESTS)
def test_good_requests_validate(payload: dict) -> None:
    request = Request.model_validate(payload)
    assert request.id == payload["id"]


@pytest.mark.parametrize(
    ("payload", "expect"),
    [
        ({"image": {"url": "https://example.com/a.jpg"}}, "id"),
        ({"id": "", "image": {"url": "https://example.com/a.jpg"}}, "id"),
        ({"id": "   ", "image": {"url": "https://example.com/a.jpg"}}, "blank"),
        ({"id": "x" * 257, "image": {"url": "https://example.com/a.jpg"}}, "256"),
        ({"id": "a", "image": {"url": "https://example.com/a.jpg", "s3": {"bucket": "abc", "key": "k"}}}, "exactly one"),
        ({"id": "a", "image": {}}, "exactly one"),
        ({"id": "a"}, "image"),
        ({"id": "a", "image": {"base64": "this is not base64!"}}, "base64"),
        ({"id": "a", "image": {"url": "ftp://example.com/a.jpg"}}, "http"),
        ({"id": "a", "image": {"url": "file:///etc/passwd"}}, "http"),
        ({"id": "a", "image": {"url": "javascript:alert(1)"}}, "http"),
        ({"id": "a", "image": {"s3": {"bucket": "ab", "key": "k"}}}, "bucket"),
        ({"id": "a", "image": {"s3": {"bucket": "abc", "key": ""}}}, "key"),
        ({"id": "a", "image": {"url": "https://example.com/a.jpg"}, "priority": 1}, "priority"),
    ],
)
def test_bad_requests_are_rejected(payload: dict, expect: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Request.model_validate(payload)
    assert expect in str(caught.value)


def test_inline_image_over_the_context_cap_is_rejected() -> None:
    payload = {"id": "a", "image": {"base64": base64.b64encode(b"x" * 300).decode()}}
    with pytest.raises(ValidationError, match="inline cap"):
        Request.model_validate(payload, context={"max_inline_bytes": 200})
    assert Request.model_validate(payload, context={"max_inline_bytes": 400}).id == "a"


def test_inline_image_over_the_default_cap_is_rejected() -> None:
    from schemas.requests import DEFAULT_MAX_INLINE_BYTES

    oversized = base64.b64encode(b"\0" * (DEFAULT_MAX_INLINE_BYTES + 3)).decode()
    with pytest.raises(ValidationError, match="inline cap"):
        Request.model_validate({"id": "a", "image": {"base64": oversized}})


def test_image_description_never_contains_inline_bytes() -> None:
    encoded = base64.b64encode(b"secret pixels").decode()
    request = Request.model_validate({"id": "a", "image": {"base64": encoded}})
    assert encoded not in request.image.describe()
    s3 = Request.model_validate(GOOD_REQUESTS[1])
    assert s3.image.describe() == "s3://photos/cat.jpg?versionId=3"


# --- JSON Schemas from the CLI ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def printed_schemas() -> dict[str, dict]:
    script = Path(sys.executable).with_name("labelstream")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "labelstream.cli"]
    done = subprocess.run([*command, "schema"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_schema_command_prints_every_message_type(printed_schemas: dict[str, dict]) -> None:
    for name in ("request", "label_record", "embedding_record"):
        assert name in printed_schemas
    assert set(MESSAGE_TYPES) <= set(printed_schemas)
    for schema in printed_schemas.values():
        jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("payload", GOOD_REQUESTS)
def test_request_schema_accepts_good_requests(printed_schemas: dict[str, dict], payload: dict) -> None:
    jsonschema.validate(payload, printed_schemas["request"])


def test_request_schema_rejects_missing_id_and_unknown_fields(printed_schemas: dict[str, dict]) -> None:
    schema = printed_schemas["request"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"image": {"url": "https://example.com/a.jpg"}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"id": "a", "image": {"url": "https://example.com/a.jpg"}, "extra": 1}, schema)


def test_embedding_record_schema_accepts_a_real_record(printed_schemas: dict[str, dict]) -> None:
    record = EmbeddingRecord.from_vector("a", ModelRef(name="m", pretrained=None), np.ones(4, dtype=np.float32))
    jsonschema.validate(json.loads(record.model_dump_json()), printed_schemas["embedding_record"])


# --- embedding records ------------------------------------------------------------------------------


def test_embedding_record_round_trips_a_vector() -> None:
    vector = np.random.default_rng(0).standard_normal(768).astype(np.float32)
    record = EmbeddingRecord.from_vector("img-1", ModelRef(name="convnext_large_d_320", pretrained="laion"), vector)

    wire = record.model_dump_json()
    back = EmbeddingRecord.model_validate_json(wire)

    assert back == record
    assert back.dim == 768 and back.dtype == "float32" and back.encoding == "base64"
    np.testing.assert_array_equal(back.to_vector(), vector)
    # The documented wire format: base64 of little-endian float32 bytes.
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(json.loads(wire)["vector"]), dtype="<f4"), vector)


def test_embedding_record_converts_other_dtypes_to_float32() -> None:
    vector = np.array([0.5, -1.25, 3.0], dtype=np.float64)
    record = EmbeddingRecord.from_vector("a", ModelRef(name="m", pretrained=None), vector)
    assert record.to_vector().dtype == np.dtype("<f4")
    assert record.to_vector().tolist() == [0.5, -1.25, 3.0]
