"""Taxonomy files: parsing, validation errors a user can act on, versions, the built-ins."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import TaxonomyError
from pipeline.taxonomy import (
    BUILTIN_IMAGENET,
    Taxonomy,
    everyday_taxonomy_path,
    fill_template,
    imagenet_taxonomy,
    load_taxonomy,
    parse_taxonomy,
    resolve_taxonomy,
)

MODEL = "tiny@abc|random-init"

GOOD = """\
# Household things.
name: household
top_k: 2
templates:
  - "a photo of a {}."
  - "a drawing of the {}."
classes:
  - name: dog
    prompts: [dog, puppy]
  - cat
  - name: teapot
"""

# The same taxonomy: keys reordered, comments and flow style changed.
GOOD_REORDERED = """\
classes: [{prompts: [dog, puppy], name: dog}, {name: cat}, teapot]   # inline now
templates: ["a photo of a {}.", "a drawing of the {}."]
top_k: 2
name: household
"""


def _write(tmp_path: Path, text: str, name: str = "taxonomy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _error_for(tmp_path: Path, text: str) -> TaxonomyError:
    path = _write(tmp_path, text)
    with pytest.raises(TaxonomyError) as caught:
        load_taxonomy(path)
    assert str(path) in str(caught.value), "the message must name the file"
    assert caught.value.code == "taxonomy.invalid"
    return caught.value


# --- parsing good files --------------------------------------------------------


def test_good_file_parses_with_defaults_and_shorthand(tmp_path: Path) -> None:
    taxonomy = load_taxonomy(_write(tmp_path, GOOD))
    assert taxonomy.name == "household"
    assert taxonomy.templates == ("a photo of a {}.", "a drawing of the {}.")
    assert taxonomy.class_names == ["dog", "cat", "teapot"]
    assert [c.expanded_prompts() for c in taxonomy.classes] == [("dog", "puppy"), ("cat",), ("teapot",)]
    assert taxonomy.top_k == 2 and taxonomy.effective_top_k == 2
    assert taxonomy.prompt_count() == 4 * 2


def test_shorthand_equals_the_long_form() -> None:
    short = parse_taxonomy("name: t\ntemplates: ['{}']\nclasses: [a, b]\n")
    long = parse_taxonomy("name: t\ntemplates: ['{}']\nclasses:\n  - name: a\n  - name: b\n")
    assert short == long
    assert short.version(MODEL) == long.version(MODEL)


def test_json_file_is_accepted(tmp_path: Path) -> None:
    path = _write(tmp_path, '{"name": "j", "templates": ["{}"], "classes": ["a", {"name": "b"}]}', "t.json")
    assert load_taxonomy(path).class_names == ["a", "b"]


def test_top_k_is_capped_by_the_class_count() -> None:
    taxonomy = parse_taxonomy("name: t\ntemplates: ['{}']\nclasses: [a, b, c]\n")
    assert taxonomy.top_k == 5
    assert taxonomy.effective_top_k == 3


def test_fill_template_leaves_braces_in_prompts_alone() -> None:
    assert fill_template("a photo of a {}.", "set {x}") == "a photo of a set {x}."


def test_shipped_everyday_taxonomy_is_valid() -> None:
    taxonomy = load_taxonomy(everyday_taxonomy_path())
    assert taxonomy.name == "everyday"
    assert len(taxonomy.classes) >= 10
    assert len(set(taxonomy.class_names)) == len(taxonomy.class_names)


# --- errors name file, field and line -------------------------------------------


def test_malformed_yaml_names_the_file_and_line(tmp_path: Path) -> None:
    error = _error_for(tmp_path, "name: x\ntemplates: [a {}\nclasses: [a, b]\n")
    assert "not valid YAML" in str(error)
    assert "line 2" in str(error)


def test_missing_field_is_named(tmp_path: Path) -> None:
    error = _error_for(tmp_path, "name: x\ntemplates: ['a {}']\n")
    assert "field 'classes'" in str(error)
    assert "required" in str(error).lower()


def test_template_without_placeholder_names_field_and_line(tmp_path: Path) -> None:
    error = _error_for(tmp_path, "name: x\nclasses: [a, b]\ntemplates:\n  - 'a {}'\n  - 'no placeholder'\n")
    assert "field 'templates'" in str(error)
    assert "'no placeholder'" in str(error)
    # "templates:" is on line 3, its value starts on line 4, the bad item is on
    # line 5. The validator checks the whole tuple, so the value's start is
    # what the message can name; the quoted template pins the item down.
    assert any(f"(line {n})" in str(error) for n in (3, 4, 5))


def test_template_with_two_placeholders_is_rejected(tmp_path: Path) -> None:
    error = _error_for(tmp_path, "name: x\ntemplates: ['a {} and {}']\nclasses: [a, b]\n")
    assert "field 'templates'" in str(error)


def test_duplicate_class_names_the_repeat_and_its_line(tmp_path: Path) -> None:
    error = _error_for(tmp_path, "name: x\ntemplates: ['a {}']\nclasses:\n  - dog\n  - cat\n  - name: dog\n")
    assert "'dog'" in str(error)
    assert "more than once" in str(error)
    assert "classes" in str(error)
    assert "(line 6)" in str(error)


def test_unknown_key_names_field_and_line(tmp_path: Path) -> None:
    error = _error_for(tmp_path, "name: x\ntemplates: ['a {}']\nclasses: [a, b]\ntopk: 3\n")
    assert "field 'topk'" in str(error)
    assert "(line 4)" in str(error)


def test_nested_class_error_names_the_class_path_and_line(tmp_path: Path) -> None:
    text = "name: x\ntemplates: ['a {}']\nclasses:\n  - a\n  - b\n  - name: c\n    prompts: ['  ']\n"
    error = _error_for(tmp_path, text)
    assert "field 'classes.2.prompts'" in str(error)
    assert "(line 7)" in str(error)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("name: 'has space'\ntemplates: ['{}']\nclasses: [a, b]\n", "name"),
        ("name: x\ntemplates: []\nclasses: [a, b]\n", "templates"),
        ("name: x\ntemplates: ['{}']\nclasses: [only]\n", "classes"),
        ("name: x\ntemplates: ['{}']\nclasses: [a, b]\ntop_k: 0\n", "top_k"),
        ("name: x\ntemplates: ['{}']\nclasses: [a, '']\n", "classes.1.name"),
    ],
)
def test_field_constraints(tmp_path: Path, text: str, field: str) -> None:
    assert f"field '{field}'" in str(_error_for(tmp_path, text))


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    assert "mapping" in str(_error_for(tmp_path, text))


def test_missing_file_is_a_taxonomy_error(tmp_path: Path) -> None:
    with pytest.raises(TaxonomyError) as caught:
        load_taxonomy(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(caught.value)


def test_non_utf8_file_is_a_taxonomy_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(TaxonomyError) as caught:
        load_taxonomy(path)
    assert str(path) in str(caught.value)


# --- versions --------------------------------------------------------------------


def test_version_is_stable_under_reordering_and_comments() -> None:
    assert parse_taxonomy(GOOD).version(MODEL) == parse_taxonomy(GOOD_REORDERED).version(MODEL)


def test_version_is_deterministic_and_short() -> None:
    version = parse_taxonomy(GOOD).version(MODEL)
    assert version == parse_taxonomy(GOOD).version(MODEL)
    assert len(version) == 16 and int(version, 16) >= 0


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("prompts: [dog, puppy]", "prompts: [dog, hound]"),
        ("prompts: [dog, puppy]", "prompts: [puppy, dog]"),
        ('"a drawing of the {}."', '"a sketch of the {}."'),
        ("  - cat\n", "  - kitten\n"),
        ("top_k: 2", "top_k: 3"),
        ("name: household", "name: household2"),
    ],
)
def test_version_changes_with_content(old: str, new: str) -> None:
    assert old in GOOD
    changed = GOOD.replace(old, new)
    assert parse_taxonomy(changed).version(MODEL) != parse_taxonomy(GOOD).version(MODEL)


def test_version_changes_with_model_identity() -> None:
    taxonomy = parse_taxonomy(GOOD)
    assert taxonomy.version("tiny@abc|random-init") != taxonomy.version("tiny@abc|/w.pt:10:1")
    assert taxonomy.version("convnext_large_d_320|laion2b_s29b_b131k_ft_soup") != taxonomy.version(MODEL)


# --- the ImageNet default ----------------------------------------------------------


def test_imagenet_taxonomy_matches_open_clip() -> None:
    import open_clip

    taxonomy = imagenet_taxonomy()
    assert taxonomy.name == BUILTIN_IMAGENET
    assert len(taxonomy.classes) == 1000
    assert len(set(taxonomy.class_names)) == 1000
    assert len(taxonomy.templates) == 80
    assert [c.expanded_prompts() for c in taxonomy.classes] == [(name,) for name in open_clip.IMAGENET_CLASSNAMES]
    assert taxonomy.effective_top_k == 5


def test_imagenet_templates_produce_open_clips_texts() -> None:
    import open_clip

    taxonomy = imagenet_taxonomy()
    for ours, theirs in zip(taxonomy.templates, open_clip.OPENAI_IMAGENET_TEMPLATES, strict=True):
        for classname in ("tench", "great white shark", "toilet paper"):
            expected = theirs(classname) if callable(theirs) else theirs.format(classname)
            assert fill_template(ours, classname) == expected


def test_imagenet_repeated_names_keep_their_prompt() -> None:
    import open_clip

    names = list(open_clip.IMAGENET_CLASSNAMES)
    repeated = {n for n in names if names.count(n) > 1}
    taxonomy = imagenet_taxonomy()
    for index, item in enumerate(taxonomy.classes):
        if names[index] in repeated and item.name != names[index]:
            assert item.name == f"{names[index]} ({index})"
            assert item.prompts == (names[index],)


def test_resolve_taxonomy_without_a_path_is_imagenet(tmp_path: Path) -> None:
    assert resolve_taxonomy(None).name == BUILTIN_IMAGENET
    assert resolve_taxonomy(_write(tmp_path, GOOD)).name == "household"


def test_taxonomy_is_frozen() -> None:
    taxonomy = parse_taxonomy(GOOD)
    with pytest.raises(Exception):  # pydantic's ValidationError for frozen instances
        taxonomy.name = "other"  # type: ignore[misc]
    assert isinstance(taxonomy, Taxonomy)
