"""The routing condition language: parsing, evaluation and the errors it reports."""

from __future__ import annotations

import builtins
import random
import re
from typing import Any

import pytest
import yaml

from pipeline.errors import TaxonomyError
from pipeline.routing import ERROR_CODE, MAX_DEPTH, RouteMatch, parse_routes

CLASSES = ["sexual", "violence", "weapons", "safe"]

ISSUE_ROUTES = """
routes:
  - name: block
    topic: moderation.block
    when: score("sexual") >= 0.85 or score("violence") >= 0.9
  - name: review
    topic: moderation.review
    when: max_score("sexual", "violence", "weapons") >= 0.4
  - name: allow
    topic: moderation.allow
    when: "true"
"""


def scores(**given: float) -> dict[str, float]:
    return {name: given.get(name, 0.0) for name in CLASSES}


def holds(condition: str, labels: set[str] | None = None, **given: float) -> bool:
    table = parse_routes([{"name": "r", "topic": "t", "when": condition}], CLASSES)
    return table.route(scores(**given), labels or set()) is not None


def parse_error(rules: list[Any], source: str = "routes.yaml") -> TaxonomyError:
    with pytest.raises(TaxonomyError) as info:
        parse_routes(rules, CLASSES, source)
    assert info.value.code == ERROR_CODE
    assert "routes.yaml" in info.value.message
    return info.value


def condition_error(condition: str, column: int) -> str:
    """Parse one bad condition; check it names the rule and the column."""
    rules = [{"name": "ok", "topic": "t", "when": "true"}, {"name": "bad", "topic": "t", "when": condition}]
    message = parse_error(rules).message
    assert "route 'bad' (rule 2)" in message
    assert f"at column {column}:" in message, message
    return message


# ------------------------------------------------------------ issue's example


@pytest.fixture(scope="module")
def issue_table():
    return parse_routes(yaml.safe_load(ISSUE_ROUTES)["routes"], CLASSES, "moderation.yaml")


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"sexual": 0.9}, "block"),
        ({"violence": 0.95}, "block"),
        ({"violence": 0.89}, "review"),
        ({"weapons": 0.4}, "review"),
        ({"sexual": 0.39, "weapons": 0.1}, "allow"),
        ({}, "allow"),
    ],
)
def test_issue_example_routes(issue_table, given: dict[str, float], expected: str) -> None:
    match = issue_table.route(scores(**given), set())
    assert match is not None and match.rule == expected
    assert match.topic == f"moderation.{expected}"


def test_match_carries_deciding_scores(issue_table) -> None:
    match = issue_table.route(scores(sexual=0.9, safe=0.1), set())
    assert match == RouteMatch("block", "moderation.block", {}, None, {"sexual": 0.9, "violence": 0.0})
    review = issue_table.route(scores(weapons=0.5), set())
    assert review is not None and review.scores == {"sexual": 0.0, "violence": 0.0, "weapons": 0.5}
    allow = issue_table.route(scores(), set())
    assert allow is not None and allow.scores == {}


def test_first_match_wins_and_no_match_is_none() -> None:
    rules = [
        {"name": "a", "topic": "ta", "when": 'score("safe") > 0.5'},
        {"name": "b", "topic": "tb", "when": 'score("safe") > 0.1'},
    ]
    table = parse_routes(rules, CLASSES)
    assert table.route(scores(safe=0.9), set()).rule == "a"  # type: ignore[union-attr]
    assert table.route(scores(safe=0.3), set()).rule == "b"  # type: ignore[union-attr]
    assert table.route(scores(safe=0.0), set()) is None


def test_headers_and_priority_travel_with_the_match() -> None:
    rule = {"name": "r", "topic": "t", "when": True, "headers": {"x-queue": "urgent"}, "priority": 7}
    match = parse_routes([rule], CLASSES).route(scores(), set())
    assert match is not None and match.headers == {"x-queue": "urgent"} and match.priority == 7


def test_yaml_booleans_and_quoted_literals() -> None:
    for when, expected in [(True, True), (False, False), ("true", True), ("false", False)]:
        table = parse_routes([{"name": "r", "topic": "t", "when": when}], CLASSES)
        assert (table.route(scores(), set()) is not None) is expected
        assert table.rules[0].text == str(when).lower()


# -------------------------------------------------------------- the language


@pytest.mark.parametrize(
    ("op", "value", "expected"),
    [
        ("<", 0.5, False), ("<", 0.6, True),
        ("<=", 0.5, True), ("<=", 0.4, False),
        (">", 0.4, True), (">", 0.5, False),
        (">=", 0.5, True), (">=", 0.6, False),
        ("==", 0.5, True), ("==", 0.4, False),
        ("!=", 0.4, True), ("!=", 0.5, False),
    ],
)  # fmt: skip
def test_comparisons(op: str, value: float, expected: bool) -> None:
    assert holds(f'score("safe") {op} {value}', safe=0.5) is expected


def test_numbers_on_either_side_and_number_forms() -> None:
    assert holds('0.3 < score("safe")', safe=0.5)
    assert holds('score("safe") >= .5', safe=0.5)
    assert holds('score("safe") < 1', safe=0.5)
    assert holds('score("safe") < 5e-1', safe=0.4)
    assert holds("1 == 1.0")


def test_boolean_equality_between_booleans() -> None:
    assert holds('label("safe") == true', labels={"safe"})
    assert holds('label("safe") != label("weapons")', labels={"safe"})
    assert not holds('label("safe") == false', labels={"safe"})


def test_and_or_not() -> None:
    assert holds("true and true") and not holds("true and false")
    assert holds("false or true") and not holds("false or false")
    assert holds("not false") and not holds("not true")
    assert holds("not not true")


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ("not false or false and false", True),  # (not false) or (false and false)
        ("not true or true and false", False),  # (not true) or (true and false)
        ("not true or true and true", True),
        ("true or true and false", True),  # and binds tighter than or
        ("not (true or true) and false", False),
        ("(not true or true) and false", False),
        ("not (false or false)", True),
        ("(((true)))", True),
    ],
)
def test_precedence_and_parentheses(condition: str, expected: bool) -> None:
    assert holds(condition) is expected


def test_not_applies_to_the_whole_comparison() -> None:
    # As in Python: `not x < y` is `not (x < y)`.
    assert holds('not score("safe") < 0.5', safe=0.7)
    assert not holds('not score("safe") < 0.5', safe=0.2)


def test_max_and_min_score() -> None:
    assert holds('max_score("sexual", "weapons") >= 0.4', weapons=0.45)
    assert not holds('max_score("sexual", "weapons") >= 0.4', violence=0.9)
    assert holds('min_score("sexual", "weapons") >= 0.4', sexual=0.5, weapons=0.4)
    assert not holds('min_score("sexual", "weapons") >= 0.4', sexual=0.9, weapons=0.1)
    assert holds("max_score('safe') == 0.25", safe=0.25)  # single quotes, one class


def test_label() -> None:
    assert holds('label("weapons")', labels={"weapons"})
    assert not holds('label("weapons")', labels={"safe"})
    assert holds('label("weapons") and score("weapons") > 0.2', labels={"weapons"}, weapons=0.3)


def test_whitespace_and_newlines_are_ignored() -> None:
    assert holds('\tscore( "safe" )\n  >=\n0.5 ', safe=0.5)


def test_long_chains_do_not_recurse() -> None:
    chain = " or ".join(["false"] * 5000 + ["true"])
    assert holds(chain)


def test_missing_score_is_a_caller_error() -> None:
    table = parse_routes([{"name": "r", "topic": "t", "when": 'score("safe") > 0'}], CLASSES)
    with pytest.raises(ValueError, match="safe"):
        table.route({}, set())


# ------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("condition", "column", "fragment"),
    [
        ('score("weapon") > 0.5', 7, "unknown class 'weapon'"),
        ('max_score("sexual", "gore") > 0.5', 21, "unknown class 'gore'"),
        ('label("safe") and 0.5', 19, "needs true/false"),
        ('score("safe") and true', 1, "needs true/false"),
        ('0.5 or label("safe")', 1, "needs true/false"),
        ('not score("safe")', 5, "needs true/false"),
        ('label("safe") > 0.5', 15, "cannot compare a bool with a number"),
        ('true == 1', 6, "cannot compare a bool with a number"),
        ('true < false', 6, "cannot compare a bool with a bool"),
        ("label()", 7, "label() takes exactly one class name, got 0"),
        ('score("safe", "sexual") > 0', 23, "score() takes exactly one class name, got 2"),
        ("max_score() > 0", 11, "at least one class name"),
        ("score(safe) > 0", 7, "expected a quoted class name"),
        ('score("safe" > 0', 14, "expected ')'"),
        ('score "safe"', 7, "expected '('"),
        ('score("safe")', 1, "the condition is a number"),
        ("0.5", 1, "the condition is a number"),
        ('score("safe) > 0', 7, "unterminated string"),
        ('score("safe") = 0.5', 15, "use '=='"),
        ('score("safe") >= 0.5 $', 22, "unexpected character '$'"),
        ("true true", 6, "after a complete condition"),
        ("(true", 6, "expected ')'"),
        ("true and", 9, "ends where a value was expected"),
        ("", 1, "ends where a value was expected"),
        ('"safe"', 1, "quoted name is only allowed inside"),
        ("maybe", 1, "unknown name 'maybe'"),
        ("True", 1, "unknown name 'True'"),
        ('0 < score("safe") < 1', 19, "cannot be chained"),
    ],
)
def test_bad_conditions(condition: str, column: int, fragment: str) -> None:
    assert fragment in condition_error(condition, column)


def test_message_format_is_stable() -> None:
    message = condition_error('score("safe") > 0.1 or score("weapon") > 0.5', 30)
    assert message == "taxonomy file routes.yaml: route 'bad' (rule 2): at column 30: unknown class 'weapon'"


def test_never_evaluates_python() -> None:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the parser must not run Python")

    patch = pytest.MonkeyPatch()
    for name in ("eval", "exec", "compile", "__import__"):
        patch.setattr(builtins, name, forbidden)
    try:
        for text in ["__import__('os')", "__import__('os').system('true')", "().__class__", "lambda: 1", "1 if 2 else 3"]:
            with pytest.raises(TaxonomyError) as info:
                parse_routes([{"name": "r", "topic": "t", "when": text}], CLASSES)
            assert info.value.code == ERROR_CODE
    finally:
        patch.undo()


def test_deep_nesting_is_a_taxonomy_error() -> None:
    message = condition_error("(" * (MAX_DEPTH + 10) + "true" + ")" * (MAX_DEPTH + 10), MAX_DEPTH + 1)
    assert "nested deeper" in message
    assert "nested deeper" in condition_error("not " * 500 + "true", 4 * MAX_DEPTH + 1)


def test_random_garbage_only_ever_raises_taxonomy_error() -> None:
    rng = random.Random(8)
    pieces = ['score("safe")', 'max_score("safe",', "label(", '"weapons"', "(", ")", ",", "and", "or",
              "not", "<", "<=", "==", "!=", "=", "0.5", "1e", ".", "true", "false", "'", '"', "$", "\n", "x"]  # fmt: skip
    alphabet = "()<>=!,.\"' \t\nabcdeflnorstu0123456789_$#\\"
    for _ in range(3000):
        if rng.random() < 0.5:
            text = " ".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        else:
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        try:
            table = parse_routes([{"name": "r", "topic": "t", "when": text}], CLASSES)
        except TaxonomyError as exc:
            assert exc.code == ERROR_CODE and re.search(r"at column \d+:", exc.message), exc.message
        else:
            assert isinstance(table.route(scores(safe=0.5), {"safe"}), (RouteMatch, type(None)))


# --------------------------------------------------------- rule-shape errors


@pytest.mark.parametrize(
    ("rule", "names", "fragment"),
    [
        ({"topic": "t", "when": "true"}, "route (rule 2)", "'name' is missing"),
        ({"name": "", "topic": "t", "when": "true"}, "route (rule 2)", "'name' is missing"),
        ({"name": "b", "when": "true"}, "route 'b' (rule 2)", "'topic' is missing"),
        ({"name": "b", "topic": 3, "when": "true"}, "route 'b' (rule 2)", "'topic' is missing"),
        ({"name": "b", "topic": "t"}, "route 'b' (rule 2)", "'when' is missing"),
        ({"name": "b", "topic": "t", "when": 1}, "route 'b' (rule 2)", "must be a condition string"),
        ({"name": "b", "topic": "t", "when": None}, "route 'b' (rule 2)", "must be a condition string"),
        ({"name": "b", "topic": "t", "wen": "true"}, "route 'b' (rule 2)", "unknown field(s) wen"),
        ({"name": "b", "topic": "t", "when": "true", "headers": ["x"]}, "route 'b' (rule 2)", "'headers'"),
        ({"name": "b", "topic": "t", "when": "true", "headers": {"x": 1}}, "route 'b' (rule 2)", "'headers'"),
        ({"name": "b", "topic": "t", "when": "true", "priority": "high"}, "route 'b' (rule 2)", "'priority'"),
        ({"name": "b", "topic": "t", "when": "true", "priority": True}, "route 'b' (rule 2)", "'priority'"),
        ("block", "route (rule 2)", "must be a mapping"),
        ({"name": "a", "topic": "t2", "when": "false"}, "route 'a' (rule 2)", "duplicate route name"),
    ],
)
def test_bad_rule_shapes(rule: Any, names: str, fragment: str) -> None:
    message = parse_error([{"name": "a", "topic": "t", "when": "true"}, rule]).message
    assert names in message and fragment in message, message


def test_routes_must_be_a_list() -> None:
    assert "must be a list" in parse_error({"name": "a"}).message  # type: ignore[arg-type]


def test_empty_route_list_routes_nothing() -> None:
    assert parse_routes([], CLASSES).route(scores(), set()) is None
