"""Routing rules for moderation triage: a small, safe condition language.

A taxonomy may carry `routes`, an ordered list of rules:

    routes:
      - name: block
        topic: moderation.block
        when: score("sexual") >= 0.85 or score("violence") >= 0.9
      - name: allow
        topic: moderation.allow
        when: "true"

Conditions are parsed by the tokenizer and Pratt parser below, never by
`eval`: user text only ever becomes the handful of node types defined here, so
there is nothing to escape from. Grammar (EBNF; precedence lowest first):

    condition  = expr END ;
    expr       = expr "or" expr | expr "and" expr | "not" expr
               | operand [ cmp_op operand ] ;            (* no chaining *)
    cmp_op     = "<" | "<=" | ">" | ">=" | "==" | "!=" ;
    operand    = NUMBER | "true" | "false" | call | "(" expr ")" ;
    call       = ( "score" | "label" ) "(" STRING ")"
               | ( "max_score" | "min_score" ) "(" STRING { "," STRING } ")" ;
    NUMBER     = digits [ "." digits ] [ exponent ] | "." digits [ exponent ] ;
    STRING     = '"' { any but '"' } '"' | "'" { any but "'" } "'" ;

Binding: or < and < not < comparisons, as in Python, so `not a or b and c`
means `(not a) or (b and c)`. Types are checked while parsing: comparisons
take numbers (== and != may also compare two booleans), and/or/not take
booleans, and the whole condition must be a boolean.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn, Union

from pipeline.errors import TaxonomyError

ERROR_CODE = "taxonomy.invalid_route"
# Deep nesting is never a real rule; the cap keeps garbage input from turning
# into a RecursionError instead of a TaxonomyError.
MAX_DEPTH = 64
RULE_KEYS = frozenset({"name", "topic", "when", "headers", "priority"})
# Headers labelstream itself puts on routed records (see schemas/routes.py); a rule may not set them.
RESERVED_HEADER_PREFIX = "labelstream"

# ---------------------------------------------------------------- syntax tree


@dataclass(frozen=True)
class Const:
    value: float | bool


@dataclass(frozen=True)
class Score:
    """score / max_score / min_score: a number taken from the record's scores."""

    func: Literal["score", "max_score", "min_score"]
    classes: tuple[str, ...]


@dataclass(frozen=True)
class Label:
    cls: str


@dataclass(frozen=True)
class Not:
    operand: Node


@dataclass(frozen=True)
class BoolOp:
    # n-ary rather than binary so long `a or b or c ...` chains stay shallow,
    # and evaluation never recurses once per operand.
    op: Literal["and", "or"]
    operands: tuple[Node, ...]


@dataclass(frozen=True)
class Compare:
    op: str
    left: Node
    right: Node


Node = Union[Const, Score, Label, Not, BoolOp, Compare]
Kind = Literal["number", "bool"]


def kind_of(node: Node) -> Kind:
    if isinstance(node, Score):
        return "number"
    if isinstance(node, Const) and not isinstance(node.value, bool):
        return "number"
    return "bool"


def referenced_classes(node: Node) -> tuple[str, ...]:
    """Classes a condition mentions, in first-mention order, without repeats."""
    found: dict[str, None] = {}
    _collect(node, found)
    return tuple(found)


def _collect(node: Node, found: dict[str, None]) -> None:
    if isinstance(node, Score):
        found.update(dict.fromkeys(node.classes))
    elif isinstance(node, Label):
        found[node.cls] = None
    elif isinstance(node, Not):
        _collect(node.operand, found)
    elif isinstance(node, BoolOp):
        for child in node.operands:
            _collect(child, found)
    elif isinstance(node, Compare):
        _collect(node.left, found)
        _collect(node.right, found)


# ------------------------------------------------------------------ tokenizer


@dataclass(frozen=True)
class Token:
    kind: Literal["num", "str", "name", "op", "punct", "end"]
    text: str
    pos: int  # 0-based offset; messages report pos + 1 as the column


class ConditionSyntaxError(Exception):
    """A problem at one position of one condition; parse_routes adds file and rule."""

    def __init__(self, pos: int, message: str) -> None:
        super().__init__(message)
        self.pos = pos
        self.message = message


_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<num>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<str>"[^"\n]*"|'[^'\n]*')
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op><=|>=|==|!=|<|>)
  | (?P<punct>[(),])
    """,
    re.VERBOSE,
)


def tokenize(text: str) -> list[Token]:
    tokens: list[Token] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise ConditionSyntaxError(pos, _bad_char_message(text[pos]))
        if match.lastgroup != "ws":
            tokens.append(Token(match.lastgroup, match.group(), pos))  # type: ignore[arg-type]
        pos = match.end()
    tokens.append(Token("end", "", len(text)))
    return tokens


def _bad_char_message(char: str) -> str:
    if char in "\"'":
        return "unterminated string"
    if char == "=":
        return "unexpected '=' (use '==' to compare)"
    return f"unexpected character {char!r}"


# --------------------------------------------------------------------- parser

FUNCTIONS = frozenset({"score", "max_score", "min_score", "label"})
COMPARISONS = frozenset({"<", "<=", ">", ">=", "==", "!="})
# Binding powers for infix operators; higher binds tighter. `not` sits
# between `and` and the comparisons, as in Python.
INFIX_POWER = {"or": 10, "and": 20, **{op: 40 for op in COMPARISONS}}
NOT_POWER = 30


class Parser:
    def __init__(self, text: str, class_names: Iterable[str]) -> None:
        self.tokens = tokenize(text)
        self.index = 0
        self.depth = 0
        self.classes = frozenset(class_names)

    def peek(self) -> Token:
        return self.tokens[self.index]

    def advance(self) -> Token:
        token = self.tokens[self.index]
        self.index = min(self.index + 1, len(self.tokens) - 1)
        return token

    def fail(self, token: Token, message: str) -> NoReturn:
        raise ConditionSyntaxError(token.pos, message)

    def condition(self) -> Node:
        start = self.peek()
        node = self.expression(0)
        if self.peek().kind != "end":
            self.fail(self.peek(), f"unexpected {_show(self.peek())} after a complete condition")
        if kind_of(node) != "bool":
            self.fail(start, "the condition is a number; compare it, e.g. score(\"x\") >= 0.5")
        return node

    def expression(self, min_power: int) -> Node:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            self.fail(self.peek(), f"condition nested deeper than {MAX_DEPTH} levels")
        left_start = self.peek()
        left = self.prefix()
        while (power := self._infix_power(self.peek())) > min_power:
            op = self.advance()
            right_start = self.peek()
            right = self.expression(power)
            left = self.infix(op, (left, left_start), (right, right_start))
        self.depth -= 1
        return left

    @staticmethod
    def _infix_power(token: Token) -> int:
        if token.kind in ("op", "name"):
            return INFIX_POWER.get(token.text, 0)
        return 0

    def prefix(self) -> Node:
        token = self.advance()
        if token.kind == "num":
            return Const(float(token.text))
        if token.kind == "name":
            return self.prefix_name(token)
        if token.text == "(":
            inner = self.expression(0)
            self.expect(")", "to close '('")
            return inner
        self.fail(token, self._not_a_value(token))

    def _not_a_value(self, token: Token) -> str:
        if token.kind == "str":
            return "a quoted name is only allowed inside score(...), label(...) and the like"
        if token.kind == "end":
            return "the condition ends where a value was expected"
        return f"expected a value, found {_show(token)}"

    def prefix_name(self, token: Token) -> Node:
        if token.text in ("true", "false"):
            return Const(token.text == "true")
        if token.text == "not":
            start = self.peek()
            return Not(self.require_bool(self.expression(NOT_POWER), start, "'not'"))
        if token.text in FUNCTIONS:
            return self.call(token)
        self.fail(token, f"unknown name {token.text!r}")

    def call(self, func: Token) -> Node:
        self.expect("(", f"after {func.text}")
        names = self.arguments()
        closing = self.expect(")", f"to close {func.text}(")
        single = func.text in ("score", "label")
        if (single and len(names) != 1) or not names:
            wanted = "exactly one class name" if single else "at least one class name"
            self.fail(closing, f"{func.text}() takes {wanted}, got {len(names)}")
        if func.text == "label":
            return Label(names[0])
        return Score(func.text, tuple(names))  # type: ignore[arg-type]

    def arguments(self) -> list[str]:
        names: list[str] = []
        if self.peek().text == ")" and self.peek().kind == "punct":
            return names
        names.append(self.class_name())
        while self.peek().text == "," and self.peek().kind == "punct":
            self.advance()
            names.append(self.class_name())
        return names

    def class_name(self) -> str:
        token = self.advance()
        if token.kind != "str":
            self.fail(token, f"expected a quoted class name, found {_show(token)}")
        name = token.text[1:-1]
        if name not in self.classes:
            self.fail(token, f"unknown class {name!r}")
        return name

    def expect(self, text: str, why: str) -> Token:
        token = self.advance()
        if token.kind != "punct" or token.text != text:
            self.fail(token, f"expected '{text}' {why}, found {_show(token)}")
        return token

    def infix(self, op: Token, left: tuple[Node, Token], right: tuple[Node, Token]) -> Node:
        # Each operand comes with its first token, so a type error points at
        # the offending operand rather than at the operator.
        if op.text in ("and", "or"):
            self.require_bool(*left, f"'{op.text}' (left side)")
            self.require_bool(*right, f"'{op.text}' (right side)")
            return _join(op.text, left[0], right[0])  # type: ignore[arg-type]
        return self.comparison(op, left[0], right[0])

    def comparison(self, op: Token, left: Node, right: Node) -> Node:
        if isinstance(left, Compare):
            self.fail(op, "comparisons cannot be chained; join them with 'and'")
        kinds = (kind_of(left), kind_of(right))
        both_bool_equality = kinds == ("bool", "bool") and op.text in ("==", "!=")
        if kinds != ("number", "number") and not both_bool_equality:
            self.fail(op, f"'{op.text}' cannot compare a {kinds[0]} with a {kinds[1]}")
        return Compare(op.text, left, right)

    def require_bool(self, node: Node, where: Token, what: str) -> Node:
        if kind_of(node) != "bool":
            self.fail(where, f"{what} needs true/false, found a number")
        return node


def _join(op: Literal["and", "or"], left: Node, right: Node) -> BoolOp:
    # Flatten left-associative chains into one n-ary node (see BoolOp).
    if isinstance(left, BoolOp) and left.op == op:
        return BoolOp(op, left.operands + (right,))
    return BoolOp(op, (left, right))


def _show(token: Token) -> str:
    return "the end of the condition" if token.kind == "end" else repr(token.text)


def parse_condition(text: str, class_names: Iterable[str]) -> Node:
    """Parse one condition; raises ConditionSyntaxError with a position."""
    return Parser(text, class_names).condition()


# ----------------------------------------------------------------- evaluation

_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}


def evaluate(node: Node, scores: Mapping[str, float], labels: set[str] | frozenset[str]) -> float | bool:
    if isinstance(node, Const):
        return node.value
    if isinstance(node, Score):
        return _score_value(node, scores)
    if isinstance(node, Label):
        return node.cls in labels
    if isinstance(node, Not):
        return not evaluate(node.operand, scores, labels)
    if isinstance(node, BoolOp):
        results = (evaluate(child, scores, labels) for child in node.operands)
        return all(results) if node.op == "and" else any(results)
    return _COMPARE[node.op](evaluate(node.left, scores, labels), evaluate(node.right, scores, labels))


def _score_value(node: Score, scores: Mapping[str, float]) -> float:
    values = [_lookup(scores, cls) for cls in node.classes]
    if node.func == "max_score":
        return max(values)
    if node.func == "min_score":
        return min(values)
    return values[0]


def _lookup(scores: Mapping[str, float], cls: str) -> float:
    # Class names were validated at load, so a missing score is a caller bug
    # (scores must cover every class, not just the top_k); fail loudly.
    try:
        return float(scores[cls])
    except KeyError:
        raise ValueError(f"routing needs a score for class {cls!r}, which is missing") from None


# --------------------------------------------------------------------- tables


@dataclass(frozen=True)
class RouteRule:
    name: str
    topic: str
    condition: Node
    text: str  # the condition as written, for logs and error messages
    headers: dict[str, str] = field(default_factory=dict)
    priority: int | None = None

    @property
    def classes(self) -> tuple[str, ...]:
        return referenced_classes(self.condition)


@dataclass(frozen=True)
class RouteMatch:
    rule: str
    topic: str
    headers: dict[str, str]
    priority: int | None
    scores: dict[str, float]  # the classes the rule's condition names
    # The rule's condition as written; for the routed record, not for equality.
    condition: str = field(default="", compare=False)


@dataclass(frozen=True)
class RouteTable:
    rules: tuple[RouteRule, ...] = ()

    @property
    def topics(self) -> tuple[str, ...]:
        """Every rule's target topic, each once, in rule order."""
        return tuple(dict.fromkeys(rule.topic for rule in self.rules))

    def route(self, scores: Mapping[str, float], labels: set[str] | frozenset[str]) -> RouteMatch | None:
        """The first rule whose condition holds, or None when none does."""
        for rule in self.rules:
            if evaluate(rule.condition, scores, labels):
                return _match(rule, scores)
        return None


def _match(rule: RouteRule, scores: Mapping[str, float]) -> RouteMatch:
    # label("x") also names a class; report its score when we have one.
    deciding = {cls: float(scores[cls]) for cls in rule.classes if cls in scores}
    return RouteMatch(rule.name, rule.topic, dict(rule.headers), rule.priority, deciding, rule.text)


# -------------------------------------------------------------------- loading


class _RuleContext:
    """Builds messages that name the file, the rule and, if known, the column."""

    def __init__(
        self, source: str, index: int, name: str | None = None, lines: Mapping[str, int | None] | None = None
    ) -> None:
        self.source, self.index, self.name, self.lines = source, index, name, lines or {}

    def error(self, message: str, pos: int | None = None, key: str = "") -> TaxonomyError:
        line = self.lines.get(key) or self.lines.get("")
        place = f"rule {self.index}" + (f", line {line}" if line else "")
        rule = f"route {self.name!r} ({place})" if self.name else f"route ({place})"
        where = f"at column {pos + 1}: " if pos is not None else ""
        return TaxonomyError(f"taxonomy file {self.source}: {rule}: {where}{message}", code=ERROR_CODE)


def parse_routes(
    rules: list[dict[str, Any]],
    class_names: list[str],
    source: str = "<taxonomy>",
    lines: Mapping[int, Mapping[str, int | None]] | None = None,
) -> RouteTable:
    """Parse and check every rule; raises TaxonomyError(code taxonomy.invalid_route).

    `lines` maps a rule's 1-based index to the source lines of its fields
    (key "" for the rule itself), so messages can name the line as well as
    the column.
    """
    if not isinstance(rules, list):
        raise TaxonomyError(f"taxonomy file {source}: routes must be a list of rules", code=ERROR_CODE)
    parsed: list[RouteRule] = []
    seen: set[str] = set()
    for index, raw in enumerate(rules, start=1):
        rule_lines = (lines or {}).get(index)
        rule = _parse_rule(raw, class_names, _RuleContext(source, index, lines=rule_lines))
        if rule.name in seen:
            raise _RuleContext(source, index, rule.name, rule_lines).error("duplicate route name", key="name")
        seen.add(rule.name)
        parsed.append(rule)
    return RouteTable(tuple(parsed))


def _parse_rule(raw: Any, class_names: list[str], ctx: _RuleContext) -> RouteRule:
    if not isinstance(raw, dict):
        raise ctx.error("a rule must be a mapping with name, topic and when")
    ctx.name = _required_text(raw, "name", ctx)
    unknown = sorted(str(key) for key in raw if key not in RULE_KEYS)
    if unknown:
        raise ctx.error(f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(RULE_KEYS))}")
    topic = _required_text(raw, "topic", ctx)
    text, condition = _parse_when(raw, class_names, ctx)
    return RouteRule(ctx.name, topic, condition, text, _headers(raw, ctx), _priority(raw, ctx))


def _required_text(raw: dict[str, Any], key: str, ctx: _RuleContext) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ctx.error(f"'{key}' is missing or not a non-empty string", key=key)
    return value


def _parse_when(raw: dict[str, Any], class_names: list[str], ctx: _RuleContext) -> tuple[str, Node]:
    if "when" not in raw:
        raise ctx.error("'when' is missing")
    when = raw["when"]
    # YAML turns an unquoted `when: true` into a boolean; accept it as written.
    if isinstance(when, bool):
        return ("true" if when else "false"), Const(when)
    if not isinstance(when, str):
        raise ctx.error(f"'when' must be a condition string, not {type(when).__name__}", key="when")
    try:
        return when, parse_condition(when, class_names)
    except ConditionSyntaxError as exc:
        raise ctx.error(exc.message, exc.pos, key="when") from None


def _headers(raw: dict[str, Any], ctx: _RuleContext) -> dict[str, str]:
    headers = raw.get("headers", {})
    if headers is None:
        return {}
    if not isinstance(headers, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        raise ctx.error("'headers' must map header names to string values", key="headers")
    reserved = sorted(k for k in headers if k.lower().startswith(RESERVED_HEADER_PREFIX))
    if reserved:
        raise ctx.error(
            f"header(s) {', '.join(reserved)}: names starting with {RESERVED_HEADER_PREFIX!r} are set by labelstream",
            key="headers",
        )
    return dict(headers)


def _priority(raw: dict[str, Any], ctx: _RuleContext) -> int | None:
    priority = raw.get("priority")
    # bool is an int in Python; `priority: true` is a mistake, not 1.
    if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)):
        raise ctx.error("'priority' must be an integer", key="priority")
    return priority
