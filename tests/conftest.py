"""Shared fixtures: real local services (Tansu broker, moto S3), a tiny model, real photos.

Fixture contract (other test modules rely on exactly these):
  broker, s3_server, s3_client (session); new_bucket, new_topic, unique_id,
  worker_env (function); tiny_model, sample_photos (session).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from labelstream.embedded import EmbeddedBroker, EmbeddedS3, create_topic

# Set before anything imports boto3, so every client in every test finds
# credentials and a region without touching the developer's real AWS setup.
DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
os.environ.update(DUMMY_AWS_ENV)

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_CONFIG_PATH = REPO_ROOT / "pipeline" / "data" / "tiny-convnext-clip.json"
TEXTILES_PER_CLASS = 7

# kafka-python's 45 s default session timeout makes Tansu group joins take >25 s.
FAST_KAFKA_ENV = {
    "LABELSTREAM_KAFKA__SESSION_TIMEOUT_MS": "6000",
    "LABELSTREAM_KAFKA__HEARTBEAT_INTERVAL_MS": "1000",
    "LABELSTREAM_KAFKA__MAX_POLL_INTERVAL_MS": "10000",
}


@dataclass(frozen=True)
class TinyModel:
    config_path: Path
    checkpoint_path: Path


def short_unique_id() -> str:
    return uuid.uuid4().hex[:12]


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as running:
        yield running


@pytest.fixture(scope="session")
def s3_server() -> Iterator[EmbeddedS3]:
    with EmbeddedS3() as running:
        yield running


@pytest.fixture(autouse=True)
def _restore_shared_services(request: pytest.FixtureRequest) -> Iterator[None]:
    """Undo a failed outage test, so one broken test cannot break all later ones."""
    yield
    in_use = getattr(request.node, "funcargs", {})
    if isinstance(in_use.get("broker"), EmbeddedBroker):
        in_use["broker"].resume()
    if isinstance(in_use.get("s3_server"), EmbeddedS3):
        in_use["s3_server"].start()


@pytest.fixture(scope="session")
def s3_client(s3_server: EmbeddedS3) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        region_name=DUMMY_AWS_ENV["AWS_DEFAULT_REGION"],
        aws_access_key_id=DUMMY_AWS_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=DUMMY_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
    )


@pytest.fixture
def new_bucket(s3_client: Any) -> Callable[[], str]:
    def create() -> str:
        name = f"ls-test-{short_unique_id()}"
        s3_client.create_bucket(Bucket=name)
        return name

    return create


@pytest.fixture
def new_topic(broker: EmbeddedBroker) -> Callable[..., str]:
    def create(partitions: int = 3) -> str:
        name = f"ls-test-{short_unique_id()}"
        create_topic(broker.bootstrap, name, partitions)
        return name

    return create


@pytest.fixture
def unique_id() -> str:
    return short_unique_id()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """Random but reproducible weights, saved where `model.pretrained` can load them."""
    import open_clip
    import torch

    # open_clip 3.3 does not take a JSON path as a model name; register the file
    # and build it by its stem (the file name without .json).
    open_clip.add_model_config(TINY_CONFIG_PATH)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CONFIG_PATH.stem, pretrained=None)
    checkpoint_path = tmp_path_factory.mktemp("tiny-model") / "tiny-convnext-clip.pt"
    torch.save(model.state_dict(), checkpoint_path)
    return TinyModel(config_path=TINY_CONFIG_PATH, checkpoint_path=checkpoint_path)


@pytest.fixture(scope="session")
def sample_photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two real photos from scikit-learn plus a few textile JPEGs of each class."""
    from sklearn.datasets import load_sample_images

    target = tmp_path_factory.mktemp("sample-photos")
    sources = [Path(name) for name in load_sample_images().filenames] + textile_jpegs()
    copies = []
    for source in sources:
        copy = target / f"{source.parent.name}-{source.name}"
        shutil.copyfile(source, copy)
        copies.append(copy)
    return copies


def textile_jpegs() -> list[Path]:
    import conformal_clip_data

    root = Path(conformal_clip_data.__file__).parent / "data" / "textile_images" / "simulated"
    picked = []
    for label in ("nominal", "local", "global"):
        picked += sorted((root / label).glob("*.jpg"))[:TEXTILES_PER_CLASS]
    return picked


@pytest.fixture
def worker_env(
    broker: EmbeddedBroker, s3_server: EmbeddedS3, tiny_model: TinyModel
) -> Callable[..., dict[str, str]]:
    """Environment for a worker subprocess wired to the test services and tiny model."""

    def build(**overrides: str) -> dict[str, str]:
        return {
            **os.environ,
            **DUMMY_AWS_ENV,
            **FAST_KAFKA_ENV,
            "LABELSTREAM_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap,
            "LABELSTREAM_S3__ENDPOINT_URL": s3_server.endpoint_url,
            "LABELSTREAM_MODEL__NAME": str(tiny_model.config_path),
            "LABELSTREAM_MODEL__PRETRAINED": str(tiny_model.checkpoint_path),
            "LABELSTREAM_MODEL__DEVICE": "cpu",
            "LABELSTREAM_LOG__FORMAT": "json",
            # Parallel workers in one test would fight over the default 9400;
            # tests that scrape metrics pass a free port explicitly.
            "LABELSTREAM_METRICS__PORT": "0",
            **overrides,
        }

    return build
