"""Configuration: frozen pydantic-settings models.

Sources, strongest first: environment (`LABELSTREAM_`, `__` for nesting), then
the optional YAML file given with `--config`, then the defaults below. Secrets
are `SecretStr`, so they render as `**********` in logs and reprs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from pipeline.errors import ConfigError


_ENV_PREFIX = "LABELSTREAM_"


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaSettings(_Section):
    bootstrap_servers: str = "localhost:9092"
    group_id: str = "labelstream"
    client_id: str = "labelstream"
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    # Cooperative rebalancing moves only the partitions that change owner, so
    # the rest keep flowing while a member joins or leaves.
    assignor: Literal["cooperative-sticky", "range", "roundrobin"] = "cooperative-sticky"
    # exactly_once only. Stable per worker instance, so a restarted worker
    # fences its crashed predecessor and aborts its open transaction.
    transactional_id: str | None = None
    transaction_timeout_ms: int = Field(60_000, gt=0)
    # kafka-python's 45 s default session timeout makes group joins slow; these
    # defaults favour quick rebalances and are all overridable.
    session_timeout_ms: int = Field(10_000, gt=0)
    heartbeat_interval_ms: int = Field(3_000, gt=0)
    max_poll_interval_ms: int = Field(300_000, gt=0)
    max_poll_records: int = Field(500, gt=0)
    request_timeout_ms: int = Field(30_000, gt=0)
    produce_timeout_s: float = Field(30.0, gt=0)

    def ack_wait_s(self) -> float:
        """How long the poll thread may wait for acknowledgements in one checkpoint.

        Capped at a third of max_poll_interval_ms: a stalled broker must make the
        checkpoint retry later, not hold the poll thread until the group evicts us.
        """
        return min(self.produce_timeout_s, self.max_poll_interval_ms / 3000.0)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None


class TopicSettings(_Section):
    requests: str = "labelstream.requests"
    labels: str = "labelstream.labels"
    embeddings: str = "labelstream.embeddings"
    dlq: str = "labelstream.dlq"
    taxonomies: str = "labelstream.taxonomies"


class S3Settings(_Section):
    endpoint_url: str | None = None
    region: str = "us-east-1"
    # When non-empty, requests can never make the worker read any other bucket.
    allowed_buckets: tuple[str, ...] = ()
    max_pool_connections: int = Field(32, gt=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(30.0, gt=0)


class FetchSettings(_Section):
    max_bytes: int = Field(50 * 1024 * 1024, gt=0)
    max_inline_bytes: int = Field(8 * 1024 * 1024, gt=0)
    threads: int = Field(8, gt=0)
    url_enabled: bool = False
    url_timeout_s: float = Field(10.0, gt=0)
    url_max_redirects: int = Field(3, ge=0)
    # Hosts (or IP literals) that may be fetched even when they resolve to
    # loopback or private addresses; empty means none may.
    url_allowed_hosts: tuple[str, ...] = ()


class ModelSettings(_Section):
    name: str = "convnext_large_d_320"
    pretrained: str | None = "laion2b_s29b_b131k_ft_soup"
    device: str = "auto"
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    cache_dir: Path | None = None
    # The settings below change nothing on a CPU except `batch_shapes`.
    # Page-locked host batches, so the copy to the GPU overlaps compute.
    pin_memory: bool = True
    channels_last: bool = True
    # torch.compile the image tower; warmed up on every batch shape before consuming starts.
    compile: bool = False
    # Batches are padded up to the next of these sizes (larger batches run
    # unpadded), so a compiled graph is reused instead of recompiled. Empty: no padding.
    batch_shapes: tuple[int, ...] = ()

    @field_validator("batch_shapes")
    @classmethod
    def _sorted_positive_shapes(cls, shapes: tuple[int, ...]) -> tuple[int, ...]:
        if any(size <= 0 for size in shapes):
            raise ValueError("batch shapes must be positive")
        return tuple(sorted(set(shapes)))

    @field_validator("pretrained")
    @classmethod
    def _empty_means_none(cls, value: str | None) -> str | None:
        # LABELSTREAM_MODEL__PRETRAINED="" is how an environment says "random weights".
        return value or None


class TaxonomySettings(_Section):
    # With no path, files or dir, the worker serves the built-in ImageNet-1k
    # taxonomy (open_clip's class names and its 80 OpenAI templates), the
    # setup behind the model card's accuracy.
    path: Path | None = None
    files: tuple[Path, ...] = ()
    # Every *.yaml, *.yml and *.json file in it is a taxonomy; new ones are picked up live.
    dir: Path | None = None
    # For requests that name no taxonomy; defaults to `path`'s taxonomy, else the first one loaded.
    default: str | None = None
    # Where text-feature classifiers are kept between restarts; None disables the cache.
    cache_dir: Path | None = None
    # How often files are checked for edits; 0 turns the watcher off.
    watch_interval_s: float = Field(2.0, ge=0)
    # Follow `topics.taxonomies` for fleet-wide taxonomy updates.
    feed_enabled: bool = True


class BatchSettings(_Section):
    max_size: int = Field(32, gt=0)
    max_wait_ms: int = Field(50, ge=0)


class PreprocessSettings(_Section):
    # exact: open_clip's own eval transform on the full-size image (parity).
    # fast: JPEG DCT-domain downscale (draft) and Image.reduce() for other large
    # images first, never below the model's input size; slightly different pixels.
    mode: Literal["exact", "fast"] = "exact"


class CacheSettings(_Section):
    # Content-hash dedupe: SHA-256 of the image bytes -> embedding and labels. 0 disables it.
    max_entries: int = Field(10_000, ge=0)


class ImageSettings(_Section):
    allowed_formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
    # Far below Pillow's 89 MP default: a 12 MP phone photo is the common case.
    max_pixels: int = Field(64_000_000, gt=0)
    min_side: int = Field(1, gt=0)


class WorkerSettings(_Section):
    max_in_flight: int = Field(256, gt=0)
    decode_threads: int = Field(0, ge=0)
    commit_interval_ms: int = Field(200, ge=0)
    drain_timeout_s: float = Field(30.0, gt=0)
    # On revocation, how long to let in-flight work of the revoked partitions finish.
    revoke_timeout_s: float = Field(5.0, ge=0)
    poll_timeout_ms: int = Field(100, gt=0)


class RetrySettings(_Section):
    """Exponential backoff with full jitter for transient failures (S3 5xx, timeouts, broker errors)."""

    initial_backoff_ms: int = Field(200, gt=0)
    max_backoff_ms: int = Field(5_000, gt=0)
    # Total time one input may spend retrying before it is dead-lettered.
    budget_s: float = Field(60.0, gt=0)
    # How long outputs may fail to reach the broker before the worker gives up and exits.
    publish_budget_s: float = Field(300.0, gt=0)


class DeadLetterSettings(_Section):
    """Like arroyo's DlqLimit: a bad deploy halts instead of dead-lettering the stream."""

    max_consecutive: int = Field(100, gt=0)
    max_ratio: float = Field(0.5, gt=0, le=1.0)
    window: int = Field(500, gt=0)
    # The ratio rule only applies once this many recent outcomes are known.
    min_messages: int = Field(50, gt=0)
    # A run of dead letters is held back from the commit this long, so that the
    # breaker can trip before committing past the last good message.
    hold_timeout_s: float = Field(10.0, ge=0)


class LogSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["auto", "json", "console"] = "auto"


class MetricsSettings(_Section):
    # One HTTP port serves /metrics, /healthz and /readyz; 0 turns the server off.
    port: int = Field(9400, ge=0, le=65535)
    host: str = "0.0.0.0"


class HealthSettings(_Section):
    # /healthz fails once the poll loop has not turned, or a stage has been busy
    # on one piece of work, for this long. As long as max_poll_interval_ms's
    # default: a slow CPU batch of a large model must not get the pod restarted.
    stall_threshold_s: float = Field(300.0, gt=0)
    # /readyz fails after this many inference failures in a row (1: the last one failed).
    max_inference_failures: int = Field(3, gt=0)


class HttpRateLimitSettings(_Section):
    # Per API key: a token bucket refilled at `per_second`, holding at most `burst`; 0 turns it off.
    per_second: float = Field(0.0, ge=0)
    burst: int = Field(10, gt=0)


class HttpSettings(_Section):
    """The OpenAI-compatible HTTP API (`labelstream serve`, `labelstream run --http`)."""

    host: str = "0.0.0.0"
    port: int = Field(8000, ge=0, le=65535)
    # Plain keys (never logged), or a file of SHA-256 hex digests, one per line, so plain keys need
    # not sit in config. With neither, every /v1 request is refused.
    api_keys: tuple[SecretStr, ...] = ()
    api_key_hashes_file: Path | None = None
    rate_limit: HttpRateLimitSettings = HttpRateLimitSettings()
    max_body_bytes: int = Field(16 * 1024 * 1024, gt=0)
    max_inputs: int = Field(64, gt=0)
    # HTTP items waiting for the model; beyond it the API answers 503 with Retry-After.
    max_queue: int = Field(256, gt=0)
    # Slots of each batch HTTP items may take when they are waiting; Kafka items fill the rest.
    batch_share: float = Field(0.5, gt=0, le=1.0)
    # A batch that carries HTTP items is cut to this many items (unset: batch.max_size). On a CPU
    # the model call grows with the batch, so a small value keeps interactive latency low under
    # a stream backlog at some cost in stream throughput; on a GPU leave it unset.
    interactive_batch_size: int | None = Field(None, gt=0)
    # Inline label sets built into classifiers, kept by content hash (least recently used goes first).
    classifier_cache_entries: int = Field(32, gt=0)
    # Extra names the served model answers to in `model`.
    model_aliases: tuple[str, ...] = ()
    request_timeout_s: float = Field(60.0, gt=0)


class TagSinkSettings(_Section):
    """Write each labelled S3 request's top labels back onto its source object (docs/dataset-sinks.md)."""

    enabled: bool = False
    # Label tags per taxonomy (`labelstream:<taxonomy>:top1`, ...); S3 allows 10 tags in all.
    max_labels: int = Field(3, ge=0, le=9)
    # Labels scoring below this are not written as tags (the marker always is).
    min_score: float = Field(0.0, ge=0, le=1)
    # Only these taxonomies are written; empty means every taxonomy.
    taxonomies: tuple[str, ...] = ()
    # Concurrent GetObjectTagging/PutObjectTagging calls per checkpoint.
    threads: int = Field(8, gt=0)


class ManifestSinkSettings(_Section):
    """Label records as Parquet files under an S3 prefix (docs/dataset-sinks.md)."""

    enabled: bool = False
    # s3://bucket/prefix/ ; files go to <prefix>taxonomy=<name>/date=<YYYY-MM-DD>/.
    uri: str | None = None
    # A partition's buffer is rolled into files at this many rows, or when its oldest row is this old.
    max_records: int = Field(10_000, gt=0)
    max_age_s: float = Field(300.0, gt=0)
    # Adds the `embedding` column, fixed_size_list<float32>[embed_dim].
    embeddings: bool = False
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"
    # Only these taxonomies are written; empty means every taxonomy.
    taxonomies: tuple[str, ...] = ()

    @field_validator("uri")
    @classmethod
    def _s3_uri(cls, uri: str | None) -> str | None:
        if uri is None:
            return None
        bucket, _, _ = uri.removeprefix("s3://").partition("/")
        if not uri.startswith("s3://") or len(bucket) < 3:
            raise ValueError("must look like s3://bucket/prefix/")
        return uri if uri.endswith("/") else uri + "/"

    @model_validator(mode="after")
    def _uri_when_enabled(self) -> ManifestSinkSettings:
        if self.enabled and self.uri is None:
            raise ValueError("sinks.manifest.uri is required when the manifest sink is enabled")
        return self


class SinkSettings(_Section):
    """Optional dataset sinks, written before the input offsets are committed."""

    tags: TagSinkSettings = TagSinkSettings()
    manifest: ManifestSinkSettings = ManifestSinkSettings()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LABELSTREAM_",
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
    )

    delivery: Literal["at_least_once", "exactly_once"] = "at_least_once"
    kafka: KafkaSettings = KafkaSettings()
    topics: TopicSettings = TopicSettings()
    s3: S3Settings = S3Settings()
    fetch: FetchSettings = FetchSettings()
    model: ModelSettings = ModelSettings()
    taxonomy: TaxonomySettings = TaxonomySettings()
    batch: BatchSettings = BatchSettings()
    image: ImageSettings = ImageSettings()
    preprocess: PreprocessSettings = PreprocessSettings()
    cache: CacheSettings = CacheSettings()
    worker: WorkerSettings = WorkerSettings()
    retry: RetrySettings = RetrySettings()
    dead_letter: DeadLetterSettings = DeadLetterSettings()
    log: LogSettings = LogSettings()
    metrics: MetricsSettings = MetricsSettings()
    health: HealthSettings = HealthSettings()
    sinks: SinkSettings = SinkSettings()
    http: HttpSettings = HttpSettings()


def load_settings(config_file: Path | None = None) -> Settings:
    """Build settings from the environment over an optional YAML file.

    Raises ConfigError naming the file and every bad field, so a typo fails
    at start-up instead of surfacing as odd behaviour later.
    """
    if config_file is not None:
        _check_yaml_file(Path(config_file))
    _check_environment_names()
    settings_cls = _settings_class_for(config_file)
    try:
        return settings_cls()
    except ValidationError as exc:
        where = f"config file {config_file}" if config_file else "configuration"
        raise ConfigError(f"{where}: {_describe_validation_error(exc)}") from exc


def _check_yaml_file(path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"config file {path}: not found")
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path}: not valid YAML: {exc}") from exc
    if document is not None and not isinstance(document, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping of sections, not {type(document).__name__}")


def _check_environment_names() -> None:
    """pydantic-settings ignores unknown top-level variables; a typo such as
    LABELSTREAM_KAFKA_BOOTSTRAP_SERVERS (one underscore) must not pass silently."""
    known = set(Settings.model_fields)
    for name in os.environ:
        if not name.upper().startswith(_ENV_PREFIX):
            continue
        field = name[len(_ENV_PREFIX) :].split("__", 1)[0].lower()
        if field not in known:
            raise ConfigError(f"environment variable {name}: unknown setting '{field}'; known sections: {sorted(known)}")


def _settings_class_for(config_file: Path | None) -> type[Settings]:
    if config_file is None:
        return Settings

    class FileSettings(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            yaml_source = YamlConfigSettingsSource(settings_cls, yaml_file=config_file)
            return (init_settings, env_settings, yaml_source, file_secret_settings)

    return FileSettings


def _describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"field '{field}': {err['msg']}")
    return "; ".join(parts)
