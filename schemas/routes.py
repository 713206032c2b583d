"""The routed record: what a moderation-triage route topic carries.

One per label record whose taxonomy has a matching routing rule (see
pipeline/routing.py), keyed by the request id like the label record, and
produced in the same checkpoint (and, in exactly-once mode, the same
transaction). The rule's headers become Kafka headers, next to these two:
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from schemas.labels import LabelRecord
from schemas.requests import ImageSource

# Kafka headers on every routed record, so a review tool can sort or filter without parsing the value.
ROUTE_HEADER = "labelstream-route"
# Only when the rule sets a priority: the decimal integer, e.g. b"90".
PRIORITY_HEADER = "labelstream-priority"


class RoutedRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    # The name of the rule that matched (the first one, in file order, whose condition held).
    route: str
    # The rule's condition, as written in the taxonomy.
    condition: str
    # The rule's priority, for sorting a review queue; None when the rule sets none.
    priority: int | None = None
    # The score of every class the condition names: what decided the route.
    scores: dict[str, float] = Field(default_factory=dict)
    # The rule's headers (also sent as Kafka headers).
    headers: dict[str, str] = Field(default_factory=dict)
    # Where the image is, so a reviewer can open it: the request's s3 or url source
    # (an inline base64 image is not repeated here; None then).
    image: ImageSource | None = None
    # The label record published to the labels topic for the same image, in full.
    label: LabelRecord
