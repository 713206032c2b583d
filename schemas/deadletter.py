"""The dead-letter record: the original record, untouched, plus why it failed.

Like Kafka Connect's `__connect.errors.*` and Spring Kafka's `kafka_dlt-*`
headers, the key, value and headers of the input are kept byte for byte, and
headers named `labelstream_dlt-*` say where it came from and what happened.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

HEADER_PREFIX = "labelstream_dlt-"


class DeadLetterHeaders(BaseModel):
    model_config = ConfigDict(frozen=True)

    original_topic: str
    original_partition: int
    original_offset: int
    original_timestamp: int | None = None
    consumer_group: str
    stage: str
    error_code: str
    error_message: str
    retryable: bool
    attempts: int
    request_id: str | None = None

    def to_kafka_headers(self) -> list[tuple[str, bytes]]:
        return [
            (HEADER_PREFIX + name.replace("_", "-"), _encode(value))
            for name, value in self.model_dump().items()
            if value is not None
        ]

    @classmethod
    def from_kafka_headers(cls, headers: list[tuple[str, bytes]]) -> DeadLetterHeaders:
        fields = {
            name[len(HEADER_PREFIX) :].replace("-", "_"): value.decode("utf-8")
            for name, value in headers
            if name.startswith(HEADER_PREFIX)
        }
        return cls.model_validate(fields)


def _encode(value: object) -> bytes:
    if isinstance(value, bool):
        return b"true" if value else b"false"
    return str(value).encode("utf-8")
