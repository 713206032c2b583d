"""S3 object tags that labelstream writes, and how to recognise them.

Shared by the tag sink (which writes them) and `labelstream backfill` (which
skips objects already labelled). The marker tag says "this object was
labelled with this taxonomy version"; a taxonomy version is a content hash
of the taxonomy *and* the model identity, so one comparison covers both.

S3 limits (PutObjectTagging): at most 10 tags per object, keys up to 128
characters, values up to 256, characters limited to letters, digits, spaces
and `+ - = . _ : / @`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

MAX_TAGS = 10
MAX_KEY_CHARS = 128
MAX_VALUE_CHARS = 256
# Everything labelstream writes starts with this, so merging never touches the user's own tags.
TAG_PREFIX = "labelstream:"
_DISALLOWED = re.compile(r"[^A-Za-z0-9 +\-=._:/@]")


def clean_tag_text(text: str, limit: int) -> str:
    """Replace characters S3 rejects with `_` and cut to `limit` characters."""
    return _DISALLOWED.sub("_", text)[:limit]


def marker_key(taxonomy_name: str) -> str:
    return clean_tag_text(f"{TAG_PREFIX}{taxonomy_name}", MAX_KEY_CHARS)


def is_labelled(tags: Mapping[str, str], taxonomy_name: str, taxonomy_version: str) -> bool:
    """True when the marker says the object was labelled with exactly this taxonomy version."""
    return tags.get(marker_key(taxonomy_name)) == taxonomy_version


# -- the tags one labelled request writes ---------------------------------------------------

# Why a tag was cut short or left out; the `reason` label of labelstream_object_tags_dropped_total.
DROP_TAG_LIMIT = "tag_limit"  # one of this taxonomy's label tags did not fit in MAX_TAGS
DROP_MARKER_NO_ROOM = "marker_no_room"  # the object's own tags leave no room even for the marker
DROP_EVICTED = "other_taxonomy_evicted"  # another taxonomy's label tag made room for this one's
DROP_VALUE_TRUNCATED = "value_truncated"  # a class name longer than MAX_VALUE_CHARS was cut
DROP_KEY_TRUNCATED = "key_truncated"  # a taxonomy name too long for a key was cut
DROP_CHARS_REPLACED = "chars_replaced"  # characters S3 rejects were replaced by `_`
DROP_REASONS = (
    DROP_TAG_LIMIT, DROP_MARKER_NO_ROOM, DROP_EVICTED, DROP_VALUE_TRUNCATED, DROP_KEY_TRUNCATED, DROP_CHARS_REPLACED,
)
_RANK_SEPARATOR = ":top"


@dataclass(frozen=True)
class TagSet:
    """Tags to put on an object, and what had to be cut or left out to respect S3's limits."""

    tags: dict[str, str]
    dropped: Counter[str] = field(default_factory=Counter)


def label_key(taxonomy_name: str, rank: int) -> str:
    """`labelstream:<taxonomy>:top<rank>`; the taxonomy part is cut so the rank always fits."""
    suffix = f"{_RANK_SEPARATOR}{rank}"
    return clean_tag_text(f"{TAG_PREFIX}{taxonomy_name}", MAX_KEY_CHARS - len(suffix)) + suffix


def labelstream_tags(
    taxonomy_name: str, taxonomy_version: str, labels: Sequence[tuple[str, float]], max_labels: int, min_score: float = 0.0
) -> TagSet:
    """The marker and the top `max_labels` class names (score >= min_score), cleaned to S3's rules.

    Ordered by priority: the marker first, then rank 1, 2, ...
    """
    dropped: Counter[str] = Counter()
    if len(f"{TAG_PREFIX}{taxonomy_name}") > MAX_KEY_CHARS - len(f"{_RANK_SEPARATOR}{max(max_labels, 1)}"):
        dropped[DROP_KEY_TRUNCATED] += 1
    tags = {marker_key(taxonomy_name): clean_tag_text(taxonomy_version, MAX_VALUE_CHARS)}
    chosen = [name for name, score in labels if score >= min_score][:max_labels]
    for rank, name in enumerate(chosen, start=1):
        tags[label_key(taxonomy_name, rank)] = _tag_value(name, dropped)
    return TagSet(tags, dropped)


def _tag_value(text: str, dropped: Counter[str]) -> str:
    if _DISALLOWED.search(text):
        dropped[DROP_CHARS_REPLACED] += 1
    if len(text) > MAX_VALUE_CHARS:
        dropped[DROP_VALUE_TRUNCATED] += 1
    return clean_tag_text(text, MAX_VALUE_CHARS)


# -- merging with what the object already carries ------------------------------------------


def owned_by(key: str, taxonomy_name: str) -> bool:
    """True for the marker and label tags labelstream writes for `taxonomy_name`."""
    if key == marker_key(taxonomy_name):
        return True
    base, separator, rank = key.rpartition(_RANK_SEPARATOR)
    return bool(separator) and rank.isdigit() and key == label_key(taxonomy_name, int(rank))


def merge_tags(existing: Mapping[str, str], ours: TagSet, taxonomy_name: str) -> TagSet:
    """The object's tags after writing `ours` (from `labelstream_tags`) for `taxonomy_name`.

    The object's own (non-`labelstream:`) tags are always kept. This
    taxonomy's previous tags are replaced. The room left under MAX_TAGS goes,
    in this order, to: this taxonomy's marker; other taxonomies' markers
    already there (so backfill still recognises them); this taxonomy's labels
    by rank; other taxonomies' labels by rank. What does not fit is dropped
    and counted. The result depends only on the inputs, so a redelivered
    request writes exactly the same tags again.
    """
    user = {k: v for k, v in existing.items() if not k.startswith(TAG_PREFIX)}
    others = {k: v for k, v in existing.items() if k.startswith(TAG_PREFIX) and not owned_by(k, taxonomy_name)}
    our_marker = marker_key(taxonomy_name)
    candidates = [
        *[(k, v, DROP_MARKER_NO_ROOM) for k, v in ours.tags.items() if k == our_marker],
        *[(k, others[k], DROP_EVICTED) for k in sorted(others, key=_rank) if _rank(k) == (0, k)],
        *[(k, v, DROP_TAG_LIMIT) for k, v in ours.tags.items() if k != our_marker],
        *[(k, others[k], DROP_EVICTED) for k in sorted(others, key=_rank) if _rank(k) != (0, k)],
    ]
    room = max(MAX_TAGS - len(user), 0)
    dropped = Counter(ours.dropped)
    for _, _, reason in candidates[room:]:
        dropped[reason] += 1
    return TagSet({**user, **{k: v for k, v, _ in candidates[:room]}}, dropped)


def _rank(key: str) -> tuple[int, str]:
    """(0, key) for a marker, (rank, key) for a label tag."""
    _, separator, rank = key.rpartition(_RANK_SEPARATOR)
    return (int(rank), key) if separator and rank.isdigit() else (0, key)
