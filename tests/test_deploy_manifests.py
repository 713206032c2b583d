"""docker-compose.yml and deploy/Dockerfile, checked without a Docker engine.

The compose file is validated against the Compose Specification's JSON schema
as vendored (offline) by check-jsonschema, then checked for what the schema
cannot know: KRaft Kafka, a GPU worker, and worker settings our config accepts.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from pipeline.config import TopicSettings, load_settings

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPOSE_PATH = REPO_ROOT / "docker-compose.yml"
DOCKERFILE_PATH = REPO_ROOT / "deploy" / "Dockerfile"
# `${NAME:-default}`: compose's interpolation with a default value.
INTERPOLATION = re.compile(r"\$\{(\w+):-([^}]*)\}")


def compose_spec_schema() -> dict[str, Any]:
    vendored = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    return json.loads(vendored.read_text(encoding="utf-8"))


def compose_errors(document: dict[str, Any]) -> list[str]:
    schema = compose_spec_schema()
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    return [error.message for error in validator_class(schema).iter_errors(document)]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_PATH.read_text(encoding="utf-8"))


def with_defaults(value: object) -> str:
    """The value compose would use when none of the referenced variables is set."""
    return INTERPOLATION.sub(lambda match: match.group(2), str(value))


def test_compose_file_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    assert compose_spec_schema()["$id"] == "compose_spec.json"
    assert compose_errors(compose) == []


def test_check_jsonschema_cli_accepts_the_compose_file() -> None:
    cli = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE_PATH)]
    result = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "breakage",
    [
        pytest.param(lambda doc: doc["services"]["worker"].update(gpus_please=True), id="unknown-service-key"),
        pytest.param(
            lambda doc: doc["services"]["worker"]["depends_on"]["kafka"].update(condition="service_ready"),
            id="bad-depends-on-condition",
        ),
        pytest.param(
            lambda doc: doc["services"]["worker"]["deploy"]["resources"]["reservations"].update(devices="gpu"),
            id="devices-not-a-list",
        ),
    ],
)
def test_schema_rejects_a_broken_compose_document(compose: dict[str, Any], breakage: Any) -> None:
    broken = copy.deepcopy(compose)
    breakage(broken)
    assert compose_errors(broken) != []


def test_kafka_runs_in_kraft_mode_without_zookeeper(compose: dict[str, Any]) -> None:
    services = compose["services"]
    kafka_env = services["kafka"]["environment"]
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert set(kafka_env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "KAFKA_CONTROLLER_QUORUM_VOTERS" in kafka_env
    assert not any("ZOOKEEPER" in key for key in kafka_env)
    assert not any("zookeeper" in name for name in services)
    assert "healthcheck" in services["kafka"]


def test_kafka_init_creates_every_configured_topic(compose: dict[str, Any]) -> None:
    script = " ".join(compose["services"]["kafka-init"]["command"])
    for topic in TopicSettings().model_dump().values():
        assert topic in script


def test_minio_init_creates_the_image_buckets(compose: dict[str, Any]) -> None:
    script = " ".join(compose["services"]["minio-init"]["command"])
    assert "local/images" in script
    assert "local/incoming" in script


def test_worker_reserves_an_nvidia_gpu(compose: dict[str, Any]) -> None:
    devices = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def test_worker_waits_for_healthy_services_and_finished_init_jobs(compose: dict[str, Any]) -> None:
    depends_on = compose["services"]["worker"]["depends_on"]
    assert depends_on["kafka"]["condition"] == "service_healthy"
    assert depends_on["minio"]["condition"] == "service_healthy"
    assert depends_on["kafka-init"]["condition"] == "service_completed_successfully"
    assert depends_on["minio-init"]["condition"] == "service_completed_successfully"


def test_worker_environment_is_accepted_by_our_settings(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    worker_env = {key: with_defaults(value) for key, value in compose["services"]["worker"]["environment"].items()}
    assert worker_env["LABELSTREAM_KAFKA__BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert worker_env["LABELSTREAM_S3__ENDPOINT_URL"] == "http://minio:9000"
    for key, value in worker_env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    assert settings.kafka.bootstrap_servers == "kafka:9092"
    assert settings.model.device == "cuda"


def test_worker_aws_credentials_default_to_the_minio_root_user(compose: dict[str, Any]) -> None:
    worker_env = compose["services"]["worker"]["environment"]
    minio_env = compose["services"]["minio"]["environment"]
    assert with_defaults(worker_env["AWS_ACCESS_KEY_ID"]) == with_defaults(minio_env["MINIO_ROOT_USER"])
    assert with_defaults(worker_env["AWS_SECRET_ACCESS_KEY"]) == with_defaults(minio_env["MINIO_ROOT_PASSWORD"])


def test_worker_image_builds_from_the_deploy_dockerfile(compose: dict[str, Any]) -> None:
    build = compose["services"]["worker"]["build"]
    assert (REPO_ROOT / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE_PATH


def test_dockerfile_runs_the_cli_as_a_non_root_user() -> None:
    lines = [line.strip() for line in DOCKERFILE_PATH.read_text(encoding="utf-8").splitlines()]
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in {"root", "0"}
    assert 'ENTRYPOINT ["labelstream"]' in lines
    assert 'CMD ["run"]' in lines
    assert len([line for line in lines if line.startswith("FROM ")]) >= 2


def test_minio_publishes_bucket_events_to_the_requests_topic(compose: dict[str, Any]) -> None:
    minio = compose["services"]["minio"]
    env = minio["environment"]
    worker_env = compose["services"]["worker"]["environment"]
    assert env["MINIO_NOTIFY_KAFKA_ENABLE_PRIMARY"] == "on"
    assert env["MINIO_NOTIFY_KAFKA_BROKERS_PRIMARY"] == worker_env["LABELSTREAM_KAFKA__BOOTSTRAP_SERVERS"]
    assert env["MINIO_NOTIFY_KAFKA_TOPIC_PRIMARY"] == TopicSettings().requests
    # Auto-creation is off, so MinIO may only start publishing once the topic exists.
    assert minio["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"
    queue_dir = env["MINIO_NOTIFY_KAFKA_QUEUE_DIR_PRIMARY"]
    assert any(volume.endswith(f":{queue_dir}") for volume in minio["volumes"])


def test_minio_init_subscribes_the_incoming_bucket_to_put_events(compose: dict[str, Any]) -> None:
    script = " ".join(compose["services"]["minio-init"]["command"])
    commands = [line.split() for line in script.splitlines() if line.strip().startswith("mc event add")]
    assert len(commands) == 1
    words = commands[0]
    # The ARN's id (PRIMARY) and type (kafka) name the MINIO_NOTIFY_KAFKA_*_PRIMARY target.
    assert "local/incoming" in words and "arn:minio:sqs::PRIMARY:kafka" in words
    assert words[words.index("--event") + 1] == "put"
    assert script.index("mc mb") < script.index("mc event add")


def test_worker_health_check_probes_healthz_on_the_metrics_port(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    port = with_defaults(worker["environment"]["LABELSTREAM_METRICS__PORT"])
    assert f"{port}:{port}" in worker["ports"]
    assert f"127.0.0.1:{port}/healthz" in " ".join(worker["healthcheck"]["test"])
