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
from collections.abc import Mapping

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
