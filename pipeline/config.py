"""Configuration: frozen pydantic-settings models.

Sources, strongest first: environment (`LABELSTREAM_`, `__` for nesting), then
the optional YAML file given with `--config`, then the defaults below. Secrets
are `SecretStr`, so they render as `**********` in logs and reprs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from pipeline.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaSettings(_Section):
    bootstrap_servers: str = "localhost:9092"
    group_id: str = "labelstream"
    client_id: str = "labelstream"
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    # kafka-python's 45 s default session timeout makes group joins slow; these
    # defaults favour quick rebalances and are all overridable.
    session_timeout_ms: int = Field(10_000, gt=0)
    heartbeat_interval_ms: int = Field(3_000, gt=0)
    max_poll_interval_ms: int = Field(300_000, gt=0)
    max_poll_records: int = Field(500, gt=0)
    request_timeout_ms: int = Field(30_000, gt=0)
    produce_timeout_s: float = Field(30.0, gt=0)
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


class TaxonomySettings(_Section):
    # None means the built-in ImageNet-1k taxonomy (open_clip's class names and
    # its 80 OpenAI templates), the setup behind the model card's accuracy.
    path: Path | None = None


class BatchSettings(_Section):
    max_size: int = Field(32, gt=0)
    max_wait_ms: int = Field(50, ge=0)


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
    poll_timeout_ms: int = Field(100, gt=0)


class LogSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["auto", "json", "console"] = "auto"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LABELSTREAM_",
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
    )

    kafka: KafkaSettings = KafkaSettings()
    topics: TopicSettings = TopicSettings()
    s3: S3Settings = S3Settings()
    fetch: FetchSettings = FetchSettings()
    model: ModelSettings = ModelSettings()
    taxonomy: TaxonomySettings = TaxonomySettings()
    batch: BatchSettings = BatchSettings()
    image: ImageSettings = ImageSettings()
    worker: WorkerSettings = WorkerSettings()
    log: LogSettings = LogSettings()


def load_settings(config_file: Path | None = None) -> Settings:
    """Build settings from the environment over an optional YAML file.

    Raises ConfigError naming the file and every bad field, so a typo fails
    at start-up instead of surfacing as odd behaviour later.
    """
    if config_file is not None and not Path(config_file).is_file():
        raise ConfigError(f"config file {config_file}: not found")
    settings_cls = _settings_class_for(config_file)
    try:
        return settings_cls()
    except ValidationError as exc:
        where = f"config file {config_file}" if config_file else "configuration"
        raise ConfigError(f"{where}: {_describe_validation_error(exc)}") from exc


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
