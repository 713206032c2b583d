"""Building kafka-python clients from settings, security options included."""

from __future__ import annotations

from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor

from pipeline.config import KafkaSettings

_ASSIGNORS = {
    "cooperative-sticky": CooperativeStickyAssignor,
    "range": RangePartitionAssignor,
    "roundrobin": RoundRobinPartitionAssignor,
}


def security_options(settings: KafkaSettings) -> dict[str, Any]:
    options: dict[str, Any] = {"security_protocol": settings.security_protocol}
    if settings.sasl_mechanism:
        options["sasl_mechanism"] = settings.sasl_mechanism
        options["sasl_plain_username"] = settings.sasl_username
        password = settings.sasl_password
        options["sasl_plain_password"] = password.get_secret_value() if password else None
    if settings.ssl_cafile:
        options["ssl_cafile"] = str(settings.ssl_cafile)
    return options


def build_consumer(settings: KafkaSettings, read_committed: bool = False) -> KafkaConsumer:
    return KafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers.split(","),
        group_id=settings.group_id,
        client_id=settings.client_id,
        enable_auto_commit=False,
        auto_offset_reset=settings.auto_offset_reset,
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
        max_poll_interval_ms=settings.max_poll_interval_ms,
        max_poll_records=settings.max_poll_records,
        request_timeout_ms=settings.request_timeout_ms,
        partition_assignment_strategy=(_ASSIGNORS[settings.assignor],),
        isolation_level="read_committed" if read_committed else "read_uncommitted",
        **security_options(settings),
    )


def build_reader(settings: KafkaSettings, purpose: str, **overrides: Any) -> KafkaConsumer:
    """A plain reader (group_id=None): it joins no group and commits nothing. `purpose` names it to the broker."""
    return KafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers.split(","),
        group_id=None,
        client_id=f"{settings.client_id}-{purpose}",
        enable_auto_commit=False,
        request_timeout_ms=settings.request_timeout_ms,
        **security_options(settings),
        **overrides,
    )


def build_transactional_producer(settings: KafkaSettings, transactional_id: str) -> KafkaProducer:
    return build_producer(
        settings,
        transactional_id=transactional_id,
        transaction_timeout_ms=settings.transaction_timeout_ms,
    )


def build_producer(settings: KafkaSettings, **overrides: Any) -> KafkaProducer:
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers.split(","),
        "client_id": settings.client_id,
        "acks": "all",
        "linger_ms": 5,
        "max_request_size": 16 * 1024 * 1024,
        "request_timeout_ms": settings.request_timeout_ms,
        **security_options(settings),
    }
    options.update(overrides)
    return KafkaProducer(**options)
