"""The object-tag contract on its own: which tags a label writes and how they merge within S3's limits.

Pure functions, no services. The end-to-end proof against real S3 is tests/test_tag_sink.py.
"""

from __future__ import annotations

import re

from pipeline.object_tags import (
    DROP_CHARS_REPLACED,
    DROP_EVICTED,
    DROP_KEY_TRUNCATED,
    DROP_MARKER_NO_ROOM,
    DROP_TAG_LIMIT,
    DROP_VALUE_TRUNCATED,
    MAX_KEY_CHARS,
    MAX_TAGS,
    MAX_VALUE_CHARS,
    TAG_PREFIX,
    TagSet,
    clean_tag_text,
    is_labelled,
    label_key,
    labelstream_tags,
    marker_key,
    merge_tags,
    owned_by,
)

S3_TAG_TEXT = re.compile(r"^[A-Za-z0-9 +\-=._:/@]*$")
LABELS = [("dog", 0.7), ("cat", 0.2), ("city street", 0.06), ("flower", 0.04)]


def user_tags(count: int) -> dict[str, str]:
    return {f"team-{i}": f"value {i}" for i in range(count)}


def assert_within_s3_limits(tags: dict[str, str]) -> None:
    assert len(tags) <= MAX_TAGS
    for key, value in tags.items():
        assert 1 <= len(key) <= MAX_KEY_CHARS and len(value) <= MAX_VALUE_CHARS
        if key.startswith(TAG_PREFIX):
            assert S3_TAG_TEXT.match(key) and S3_TAG_TEXT.match(value), (key, value)


def test_marker_contract_is_unchanged() -> None:
    tags = labelstream_tags("objects", "v1abc", LABELS, max_labels=2).tags
    assert marker_key("objects") == "labelstream:objects"
    assert is_labelled(tags, "objects", "v1abc")
    assert not is_labelled(tags, "objects", "v2")
    assert not is_labelled(tags, "other", "v1abc")
    assert clean_tag_text("a*b#c", 4) == "a_b_"


def test_labels_are_written_by_rank_after_the_marker() -> None:
    ours = labelstream_tags("objects", "v1", LABELS, max_labels=3)
    assert list(ours.tags.items()) == [
        ("labelstream:objects", "v1"),
        ("labelstream:objects:top1", "dog"),
        ("labelstream:objects:top2", "cat"),
        ("labelstream:objects:top3", "city street"),
    ]
    assert not ours.dropped


def test_min_score_leaves_out_weak_labels_but_never_the_marker() -> None:
    ours = labelstream_tags("objects", "v1", LABELS, max_labels=3, min_score=0.5)
    assert ours.tags == {"labelstream:objects": "v1", "labelstream:objects:top1": "dog"}
    none = labelstream_tags("objects", "v1", LABELS, max_labels=3, min_score=0.99)
    assert none.tags == {"labelstream:objects": "v1"}


def test_long_class_names_and_disallowed_characters_are_cleaned_and_counted() -> None:
    long_name = "a very long class name " * 20
    ours = labelstream_tags("objects", "v1", [("chat (félin) #1", 0.6), (long_name, 0.4)], max_labels=2)
    assert ours.tags["labelstream:objects:top1"] == "chat _f_lin_ _1"
    assert ours.tags["labelstream:objects:top2"] == long_name[:MAX_VALUE_CHARS]
    assert ours.dropped == {DROP_CHARS_REPLACED: 1, DROP_VALUE_TRUNCATED: 1}
    assert_within_s3_limits(ours.tags)


def test_a_taxonomy_name_too_long_for_a_key_is_cut_so_the_rank_still_fits() -> None:
    name = "t" * 128
    ours = labelstream_tags(name, "v1", LABELS, max_labels=3)
    assert ours.dropped[DROP_KEY_TRUNCATED] == 1
    assert_within_s3_limits(ours.tags)
    keys = list(ours.tags)
    assert len(set(keys)) == 4, "the marker and three label keys must stay distinct"
    assert keys[1].endswith(":top1") and keys[3].endswith(":top3")
    assert all(owned_by(key, name) for key in keys)


def test_ownership_does_not_spill_over_to_other_taxonomies_or_user_tags() -> None:
    assert owned_by("labelstream:objects", "objects")
    assert owned_by(label_key("objects", 7), "objects")
    assert not owned_by("labelstream:objects-v2", "objects")
    assert not owned_by("labelstream:objects-v2:top1", "objects")
    assert not owned_by("objects:top1", "objects")


def test_merge_keeps_user_tags_and_replaces_this_taxonomys_previous_tags() -> None:
    existing = {"owner": "team-a", "labelstream:objects": "old", "labelstream:objects:top1": "cat",
                "labelstream:objects:top3": "stale", "labelstream:other": "v9", "labelstream:other:top1": "x"}
    merged = merge_tags(existing, labelstream_tags("objects", "v2", LABELS, max_labels=2), "objects")
    assert merged.tags == {
        "owner": "team-a",
        "labelstream:objects": "v2",
        "labelstream:other": "v9",
        "labelstream:objects:top1": "dog",
        "labelstream:objects:top2": "cat",
        "labelstream:other:top1": "x",
    }
    assert not merged.dropped


def test_merge_is_idempotent() -> None:
    ours = labelstream_tags("objects", "v1", LABELS, max_labels=3)
    once = merge_tags(user_tags(5), ours, "objects")
    twice = merge_tags(once.tags, ours, "objects")
    assert twice.tags == once.tags


def test_with_eight_user_tags_the_marker_and_the_top_label_fit() -> None:
    merged = merge_tags(user_tags(8), labelstream_tags("objects", "v1", LABELS, max_labels=3), "objects")
    assert merged.tags == {**user_tags(8), "labelstream:objects": "v1", "labelstream:objects:top1": "dog"}
    assert merged.dropped == {DROP_TAG_LIMIT: 2}
    assert_within_s3_limits(merged.tags)


def test_with_ten_user_tags_nothing_is_written_and_nothing_of_theirs_dropped() -> None:
    merged = merge_tags(user_tags(10), labelstream_tags("objects", "v1", LABELS, max_labels=3), "objects")
    assert merged.tags == user_tags(10)
    assert merged.dropped == {DROP_MARKER_NO_ROOM: 1, DROP_TAG_LIMIT: 3}


def test_other_taxonomies_keep_their_markers_before_anyones_labels() -> None:
    existing = {**user_tags(6), "labelstream:moderation": "m1", "labelstream:moderation:top1": "safe",
                "labelstream:moderation:top2": "weapons"}
    merged = merge_tags(existing, labelstream_tags("objects", "v1", LABELS, max_labels=3), "objects")
    assert merged.tags == {**user_tags(6), "labelstream:objects": "v1", "labelstream:moderation": "m1",
                           "labelstream:objects:top1": "dog", "labelstream:objects:top2": "cat"}
    assert merged.dropped == {DROP_TAG_LIMIT: 1, DROP_EVICTED: 2}


def test_merge_carries_the_cleaning_counts_of_the_labels() -> None:
    ours = TagSet({"labelstream:objects": "v1"}, dropped=labelstream_tags("o", "v", [("a#", 1.0)], 1).dropped)
    assert merge_tags({}, ours, "objects").dropped == {DROP_CHARS_REPLACED: 1}
