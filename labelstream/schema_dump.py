"""`labelstream schema`: the JSON Schema of every message type."""

from __future__ import annotations

import json

from schemas import MESSAGE_TYPES


def all_schemas() -> dict[str, dict]:
    return {name: model.model_json_schema() for name, model in MESSAGE_TYPES.items()}


def print_schemas() -> int:
    print(json.dumps(all_schemas(), indent=2))
    return 0
