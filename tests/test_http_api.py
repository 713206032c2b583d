"""The HTTP API in-process: uvicorn on an ephemeral port, the tiny model, moto's real S3 server.

The official `openai` client talks to it unchanged. Vectors are compared with
open_clip's own encode_text / encode_image on the same inputs; errors are
checked for their status and OpenAI's shape.
"""

from __future__ import annotations

import base64
import io
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch
import yaml
from PIL import Image
from prometheus_client import REGISTRY

from api.server import ApiServer
from labelstream.serve import api_server
from pipeline.config import Settings
from pipeline.health import HealthState
from pipeline.inference import InferenceEngine
from pipeline.labeler import Labeler, build_labeler
from tests.conftest import TinyModel

KEY = "sk-test-0123456789"
TAXONOMY = "http-objects"
ROUTED = "http-moderation"
CLASSES = ["dog", "cat", "flower", "textile", "city street"]
TEMPLATES = ["a photo of a {}.", "a close-up photo of a {}."]
MAX_INPUTS = 8
MAX_BODY = 2 * 1024 * 1024
MAX_PIXELS = 4_000_000


@dataclass
class RunningApi:
    url: str
    settings: Settings
    labeler: Labeler
    engine: InferenceEngine
    server: ApiServer

    @property
    def model_id(self) -> str:
        return self.labeler.model.source.open_clip_name

    def client(self, key: str = KEY) -> openai.OpenAI:
        # No retries: a 429 or 503 must surface, not be waited out.
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def post(self, path: str, body: Any, key: str = KEY) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def api_settings(tiny_model: TinyModel, endpoint_url: str, taxonomy_file: Path, **http: Any) -> Settings:
    return Settings.model_validate({
        "model": {"name": str(tiny_model.config_path), "pretrained": str(tiny_model.checkpoint_path), "device": "cpu"},
        "taxonomy": {"files": [str(taxonomy_file), str(taxonomy_file.with_name("moderation.yaml"))],
                     "default": TAXONOMY, "feed_enabled": False, "watch_interval_s": 0},
        "s3": {"endpoint_url": endpoint_url},
        "fetch": {"url_enabled": True},
        "image": {"max_pixels": MAX_PIXELS},
        "batch": {"max_size": 8, "max_wait_ms": 5},
        "cache": {"max_entries": 0},
        "metrics": {"port": 0},
        "http": {"host": "127.0.0.1", "port": 0, "api_keys": [KEY], "max_inputs": MAX_INPUTS,
                 "max_body_bytes": MAX_BODY, **http},
    })  # fmt: skip


def start_api(settings: Settings, labeler: Labeler, start_engine: bool = True) -> RunningApi:
    health = HealthState.from_settings(settings.health)
    health.model_loaded()
    health.classifiers_built()
    engine = InferenceEngine(labeler, settings, health)
    if start_engine:
        engine.start()
    server = api_server(settings, labeler, engine, health, kafka=False).start()
    return RunningApi(f"http://127.0.0.1:{server.port}", settings, labeler, engine, server)


def stop_api(api: RunningApi) -> None:
    api.server.stop()
    api.engine.stop()


@pytest.fixture(scope="module")
def taxonomy_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("http-taxonomy")
    path = folder / "objects.yaml"
    path.write_text(yaml.safe_dump({"name": TAXONOMY, "templates": TEMPLATES, "classes": CLASSES, "top_k": 3}))
    # Threshold 0 selects every class, so the rule below always matches and names its deciding score.
    (folder / "moderation.yaml").write_text(yaml.safe_dump({
        "name": ROUTED, "mode": "multi_label", "threshold": 0.0, "top_k": 2, "templates": ["a photo of {}."],
        "classes": ["a weapon", "alcohol", "a landscape"],
        "routes": [{"name": "review", "topic": "moderation.review", "when": 'score("a weapon") >= 0.0',
                    "priority": 50, "headers": {"queue": "standard"}}],
    }))  # fmt: skip
    return path


@pytest.fixture(scope="module")
def settings(tiny_model: TinyModel, s3_server: Any, taxonomy_file: Path) -> Settings:
    return api_settings(tiny_model, s3_server.endpoint_url, taxonomy_file)


@pytest.fixture(scope="module")
def labeler(settings: Settings) -> Labeler:
    return build_labeler(settings)


@pytest.fixture(scope="module")
def api(settings: Settings, labeler: Labeler) -> Iterator[RunningApi]:
    running = start_api(settings, labeler)
    yield running
    stop_api(running)


@pytest.fixture(scope="module")
def reference(tiny_model: TinyModel) -> Any:
    """open_clip itself, loaded independently from the same checkpoint: what the vectors must equal."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(
        tiny_model.config_path.stem, pretrained=str(tiny_model.checkpoint_path))
    model.eval()
    tokenizer = open_clip.get_tokenizer(tiny_model.config_path.stem)

    class Reference:
        def text(self, texts: list[str]) -> np.ndarray:
            with torch.no_grad():
                return torch.nn.functional.normalize(model.encode_text(tokenizer(texts)), dim=-1).numpy()

        def image(self, path: Path) -> np.ndarray:
            with torch.no_grad(), Image.open(path) as im:
                pixels = preprocess(im).unsqueeze(0)
                return torch.nn.functional.normalize(model.encode_image(pixels), dim=-1).numpy()[0]

    return Reference()


def data_uri(path: Path) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()


def vector(embedding: Any) -> np.ndarray:
    """The client decodes base64 itself only when it chose it; an explicit base64 arrives as the string."""
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding), dtype="<f4")
    return np.asarray(embedding, dtype=np.float32)


def cosine(a: Any, b: Any) -> float:
    a, b = vector(a).astype(np.float64), vector(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def assert_error_shape(response: httpx.Response, status: int, code: str, param: str | None = None) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body


# -- the official client ------------------------------------------------------------


def test_text_embeddings_equal_open_clip_in_base64_and_float(api: RunningApi, reference: Any) -> None:
    texts = ["a photo of a dog", "a red flower in a field", "x"]
    expected = reference.text(texts)
    client = api.client()
    default = client.embeddings.create(model=api.model_id, input=texts)  # the client asks for base64
    floats = client.embeddings.create(model=api.model_id, input=texts, encoding_format="float")
    for response in (default, floats):
        assert [d.index for d in response.data] == [0, 1, 2]
        assert response.model == api.model_id
        for got, want in zip(response.data, expected, strict=True):
            assert len(got.embedding) == 64
            assert cosine(got.embedding, want) >= 0.99999
            assert abs(np.linalg.norm(got.embedding) - 1.0) < 1e-5
    assert np.allclose(default.data[0].embedding, floats.data[0].embedding, atol=1e-7)
    # Start and end tokens count; "x" is one token, so 3 for it.
    assert floats.usage.prompt_tokens == floats.usage.total_tokens
    assert floats.usage.prompt_tokens >= 3 * 3


def test_single_string_input(api: RunningApi, reference: Any) -> None:
    response = api.client().embeddings.create(model=api.model_id, input="a cat", encoding_format="float")
    assert len(response.data) == 1
    assert cosine(response.data[0].embedding, reference.text(["a cat"])[0]) >= 0.99999


def test_image_embeddings_by_data_uri_and_s3_equal_open_clip(
    api: RunningApi, reference: Any, sample_photos: list[Path], s3_client: Any, new_bucket: Callable[[], str],
) -> None:
    photos = sample_photos[:3]
    bucket = new_bucket()
    s3_client.put_object(Bucket=bucket, Key="photos/one.jpg", Body=photos[2].read_bytes())
    inputs = [data_uri(photos[0]), data_uri(photos[1]), f"s3://{bucket}/photos/one.jpg"]
    client = api.client()
    for encoding in ("base64", "float"):
        response = client.embeddings.create(model=api.model_id, input=inputs, encoding_format=encoding,  # type: ignore[arg-type]
                                            extra_body={"modality": "image"})
        assert len(response.data) == 3
        for got, path in zip(response.data, photos, strict=True):
            assert cosine(got.embedding, reference.image(path)) >= 0.99999
        assert response.usage.model_extra == {"images": 3} or getattr(response.usage, "images", None) == 3
    default = client.embeddings.create(model=api.model_id, input=inputs[:1], extra_body={"modality": "image"})
    assert cosine(default.data[0].embedding, reference.image(photos[0])) >= 0.99999


def test_models_list_names_the_model_to_pass(api: RunningApi) -> None:
    models = api.client().models.list()
    ids = [m.id for m in models.data]
    # The tiny model is given as a config path: its id is the file's stem.
    assert ids[0] == "tiny-convnext-clip"
    assert all(m.object == "model" for m in models.data)


def test_openapi_document_is_served(api: RunningApi) -> None:
    document = httpx.get(f"{api.url}/openapi.json", timeout=10).json()
    assert {"/v1/embeddings", "/v1/classify", "/v1/models"} <= set(document["paths"])


# -- keys, rate limits, models ------------------------------------------------------


def test_wrong_or_missing_key_is_an_authentication_error(api: RunningApi) -> None:
    with pytest.raises(openai.AuthenticationError) as raised:
        api.client(key="sk-wrong").embeddings.create(model=api.model_id, input="a dog")
    assert raised.value.status_code == 401
    assert raised.value.code == "invalid_api_key"
    missing = httpx.post(f"{api.url}/v1/embeddings", json={"model": api.model_id, "input": "a"}, timeout=10)
    assert_error_shape(missing, 401, "invalid_api_key")


def test_probes_and_metrics_need_no_key(api: RunningApi) -> None:
    assert httpx.get(f"{api.url}/healthz", timeout=10).status_code == 200
    ready = httpx.get(f"{api.url}/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    scraped = httpx.get(f"{api.url}/metrics", timeout=10)
    assert scraped.status_code == 200 and "labelstream_batch_items_total" in scraped.text


def test_unknown_model_is_not_found(api: RunningApi) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        api.client().embeddings.create(model="text-embedding-3-small", input="a dog")
    assert raised.value.status_code == 404
    assert raised.value.code == "model_not_found"


def test_rate_limited_key_gets_rate_limit_error(settings: Settings, labeler: Labeler) -> None:
    limited = settings.model_copy(update={"http": settings.http.model_copy(
        update={"rate_limit": settings.http.rate_limit.model_copy(update={"per_second": 0.2, "burst": 2})})})
    running = start_api(limited, labeler)
    try:
        client = running.client()
        for _ in range(2):
            client.models.list()
        with pytest.raises(openai.RateLimitError) as raised:
            client.models.list()
        assert raised.value.status_code == 429
        assert int(raised.value.response.headers["Retry-After"]) >= 1
        # Keys have their own buckets: the limit is per key, and a wrong key is still a 401.
        with pytest.raises(openai.AuthenticationError):
            running.client(key="sk-other").models.list()
    finally:
        stop_api(running)


def test_keys_from_a_hashes_file(settings: Settings, labeler: Labeler, tmp_path: Path) -> None:
    import hashlib

    hashes = tmp_path / "keys.sha256"
    hashes.write_text(f"# team a\n{hashlib.sha256(b'sk-from-file').hexdigest()}\n\n")
    from_file = settings.model_copy(update={"http": settings.http.model_copy(
        update={"api_keys": (), "api_key_hashes_file": hashes})})
    running = start_api(from_file, labeler)
    try:
        assert running.client(key="sk-from-file").models.list().data
        with pytest.raises(openai.AuthenticationError):
            running.client(key=KEY).models.list()
    finally:
        stop_api(running)


# -- classify ---------------------------------------------------------------------


def test_classify_by_taxonomy_and_inline_labels_match_the_labeler(api: RunningApi, sample_photos: list[Path]) -> None:
    photo = sample_photos[0]
    # The worker's own path for one image: prepare, then label with the taxonomy's classifier.
    classifier = api.labeler.classifier_for(TAXONOMY)
    [direct] = api.labeler.label([api.labeler.prepare_bytes(photo.read_bytes()).pixels], [classifier])
    by_name = api.post("/v1/classify", {"model": api.model_id, "input": data_uri(photo), "taxonomy": TAXONOMY})
    inline = api.post("/v1/classify", {"input": [data_uri(photo)], "labels": CLASSES, "templates": TEMPLATES,
                                       "top_k": 3})
    for response in (by_name, inline):
        assert response.status_code == 200, response.text
        [item] = response.json()["data"]
        assert item["mode"] == "single_label" and item["selected"] is None
        assert [entry["label"] for entry in item["labels"]] == [label for label, _ in direct.labels]
        assert [entry["score"] for entry in item["labels"]] == pytest.approx([s for _, s in direct.labels], abs=1e-5)
    assert by_name.json()["data"][0]["taxonomy"] == {"name": TAXONOMY, "version": classifier.version}
    assert inline.json()["data"][0]["taxonomy"]["name"].startswith("inline-")


def test_inline_label_sets_are_cached_by_content(api: RunningApi, sample_photos: list[Path]) -> None:
    body = {"input": data_uri(sample_photos[1]), "labels": ["a boat", "a tree"], "mode": "multi_label",
            "threshold": 0.0}
    first, second = api.post("/v1/classify", body), api.post("/v1/classify", body)
    assert first.status_code == 200, first.text
    assert first.json()["data"][0]["taxonomy"] == second.json()["data"][0]["taxonomy"]
    item = first.json()["data"][0]
    # Threshold 0: every class is selected, highest first.
    assert item["mode"] == "multi_label"
    assert sorted(s["label"] for s in item["selected"]) == ["a boat", "a tree"]
    other = api.post("/v1/classify", {**body, "labels": ["a boat", "a car"]})
    assert other.json()["data"][0]["taxonomy"]["version"] != item["taxonomy"]["version"]


def test_classify_errors(api: RunningApi, sample_photos: list[Path]) -> None:
    image = data_uri(sample_photos[0])
    assert_error_shape(api.post("/v1/classify", {"input": image, "taxonomy": "nope"}), 404, "taxonomy.unknown", "taxonomy")
    assert_error_shape(api.post("/v1/classify", {"input": image, "labels": ["only-one"]}), 400, "taxonomy.invalid")
    assert_error_shape(api.post("/v1/classify", {"input": image, "taxonomy": TAXONOMY, "labels": ["a", "b"]}),
                       400, "invalid_request", "taxonomy")


# -- limits -------------------------------------------------------------------------


def test_oversized_body_is_413(api: RunningApi) -> None:
    body = {"model": api.model_id, "input": "x" * (MAX_BODY + 10)}
    assert_error_shape(api.post("/v1/embeddings", body), 413, "request.too_large")


def test_too_many_inputs_is_400(api: RunningApi) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        api.client().embeddings.create(model=api.model_id, input=["a"] * (MAX_INPUTS + 1))
    assert raised.value.code == "input.too_many"
    assert_error_shape(api.post("/v1/embeddings", {"model": api.model_id, "input": ["a"] * (MAX_INPUTS + 1)}),
                       400, "input.too_many", "input")


def test_decompression_bomb_is_413(api: RunningApi) -> None:
    buffer = io.BytesIO()
    # 64 MP of one colour compresses to a few kB: far over image.max_pixels (and under Pillow's own warning).
    Image.new("1", (8_000, 8_000)).save(buffer, format="PNG")
    bomb = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    response = api.post("/v1/embeddings", {"model": api.model_id, "input": [bomb], "modality": "image"})
    assert_error_shape(response, 413, "image.decompression_bomb", "input.0")


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data/", "http://127.0.0.1:9/", "http://[::1]/"])
def test_ssrf_urls_are_refused(api: RunningApi, url: str) -> None:
    response = api.post("/v1/embeddings", {"model": api.model_id, "input": [url], "modality": "image"})
    assert_error_shape(response, 400, "url.forbidden_address", "input.0")


def test_every_input_is_checked_before_any_is_processed(api: RunningApi, sample_photos: list[Path]) -> None:
    before = metric("labelstream_batch_items_total", source="http")
    inputs = [data_uri(sample_photos[0]), "ftp://example.com/a.jpg"]
    response = api.post("/v1/embeddings", {"model": api.model_id, "input": inputs, "modality": "image"})
    assert_error_shape(response, 400, "image.unsupported_source", "input.1")
    corrupt = "data:image/jpeg;base64," + base64.b64encode(b"\xff\xd8\xff not really a jpeg").decode()
    response = api.post("/v1/embeddings", {"model": api.model_id, "input": [data_uri(sample_photos[0]), corrupt],
                                           "modality": "image"})
    assert_error_shape(response, 400, "image.corrupt", "input.1")
    assert metric("labelstream_batch_items_total", source="http") == before


def test_validation_errors_use_the_openai_shape(api: RunningApi) -> None:
    assert_error_shape(api.post("/v1/embeddings", {"model": api.model_id, "input": 5}), 400, "invalid_request", "input")
    assert_error_shape(api.post("/v1/embeddings", {"model": api.model_id, "input": "a", "modalty": "image"}),
                       400, "invalid_request", "modalty")
    missing = httpx.get(f"{api.url}/v1/nothing", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert_error_shape(missing, 404, "not_found")


# -- back-pressure and disconnects ----------------------------------------------------


@pytest.fixture
def stalled_api(settings: Settings, labeler: Labeler) -> Iterator[RunningApi]:
    """An API whose engine has not started: queued jobs stay queued until the test starts it."""
    small_queue = settings.model_copy(update={"http": settings.http.model_copy(update={"max_queue": 2})})
    running = start_api(small_queue, labeler, start_engine=False)
    yield running
    stop_api(running)


def test_full_queue_is_503_with_retry_after(stalled_api: RunningApi) -> None:
    response = stalled_api.post("/v1/embeddings", {"model": stalled_api.model_id, "input": ["a", "b", "c"]})
    assert_error_shape(response, 503, "queue_full")
    assert int(response.headers["Retry-After"]) >= 1
    # Nothing of the refused request stays queued.
    assert stalled_api.engine.depth("http") == 0


def test_a_disconnected_clients_jobs_never_reach_the_model(stalled_api: RunningApi) -> None:
    dropped = metric("labelstream_inference_dropped_total", source="http")
    ran = metric("labelstream_batch_items_total", source="http")
    gone = metric("labelstream_http_requests_total", path="/v1/embeddings", status="499")
    body = f'{{"model": "{stalled_api.model_id}", "input": "a dog"}}'.encode()
    port = int(stalled_api.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                           + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        _wait_until(lambda: stalled_api.engine.depth("http") == 1, "the job to be queued")
    _wait_until(lambda: metric("labelstream_http_requests_total", path="/v1/embeddings", status="499") == gone + 1,
                "the server to notice the disconnect")
    stalled_api.engine.start()
    _wait_until(lambda: stalled_api.engine.depth("http") == 0, "the engine to take the job")
    _wait_until(lambda: metric("labelstream_inference_dropped_total", source="http") == dropped + 1, "the drop")
    assert metric("labelstream_batch_items_total", source="http") == ran


def _wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_classify_through_the_openai_clients_generic_post(api: RunningApi, sample_photos: list[Path]) -> None:
    # The README's example: /v1/classify is not an OpenAI endpoint, but the client can still call it.
    result = api.client().post("/classify", cast_to=object, body={"input": [data_uri(sample_photos[0])],
                                                                  "taxonomy": TAXONOMY})
    assert isinstance(result, dict), result
    assert result["data"][0]["taxonomy"]["name"] == TAXONOMY
    assert len(result["data"][0]["labels"]) == 3


def test_multi_label_classify_returns_selected_and_the_matching_route(api: RunningApi, sample_photos: list[Path]) -> None:
    response = api.post("/v1/classify", {"input": data_uri(sample_photos[0]), "taxonomy": ROUTED})
    assert response.status_code == 200, response.text
    [item] = response.json()["data"]
    assert item["mode"] == "multi_label"
    assert len(item["labels"]) == 2
    assert sorted(s["label"] for s in item["selected"]) == ["a landscape", "a weapon", "alcohol"]
    route = item["route"]
    assert (route["rule"], route["topic"], route["priority"], route["headers"]) == (
        "review", "moderation.review", 50, {"queue": "standard"})
    weapon = next(s["score"] for s in item["selected"] if s["label"] == "a weapon")
    assert route["scores"] == {"a weapon": pytest.approx(weapon)}
