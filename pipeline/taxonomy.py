"""Taxonomies: what the user wants images labelled with, in plain words.

A taxonomy file is YAML (or JSON):

    name: everyday
    templates: ["a photo of a {}.", "a blurry photo of a {}."]
    top_k: 3
    classes:
      - name: dog
        prompts: [dog, puppy]      # optional; defaults to [name]
      - cat                        # shorthand for {name: cat}

Every prompt is expanded with every template, exactly as open_clip's
`build_zero_shot_classifier` expands class names.

`mode: multi_label` scores every class on its own (see pipeline/classifier.py)
and adds `threshold` (taxonomy-wide default and per class), per-class
`negative_prompts` and the taxonomy's `negative_templates`; docs/taxonomies.md
has the full format.

`routes` (optional) is an ordered list of moderation-triage rules
(pipeline/routing.py); they are parsed, and checked against the class names,
whenever a taxonomy is validated, so a file, a taxonomies-topic document and
a hot-reloaded edit are all refused the same way.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipeline.errors import TaxonomyError
from pipeline.routing import RULE_KEYS, RouteTable, parse_routes

BUILTIN_IMAGENET = "imagenet1k"
_DATA_DIR = Path(__file__).parent / "data"
DEFAULT_THRESHOLD = 0.5
# The generic negative of a multi-label class that has no negative_prompts of
# its own; it is the issue's own example ("a photo of a dog" against this).
DEFAULT_NEGATIVE_TEMPLATES = ("a photo of something that is not a {}.",)

Mode = Literal["single_label", "multi_label"]
# "" is a routing rule itself; the rest are its fields.
_ROUTE_KEYS = ("", *sorted(RULE_KEYS))


class FieldProblem(ValueError):
    """A cross-field check that knows which field is wrong.

    Pydantic reports model-level errors at the root; carrying the location
    lets the error message name the field and its line like any other error.
    """

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


class TaxonomyClass(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=256)
    prompts: tuple[str, ...] = ()
    # multi_label only: this class's decision threshold and hard negatives.
    threshold: float | None = Field(None, ge=0.0, le=1.0)
    negative_prompts: tuple[str, ...] = ()

    @field_validator("prompts", "negative_prompts")
    @classmethod
    def _prompts_not_blank(cls, prompts: tuple[str, ...]) -> tuple[str, ...]:
        if any(not p.strip() for p in prompts):
            raise ValueError("prompts must not be blank")
        return prompts

    def expanded_prompts(self) -> tuple[str, ...]:
        return self.prompts or (self.name,)


class Taxonomy(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")
    mode: Mode = "single_label"
    templates: tuple[str, ...] = Field(min_length=1)
    classes: tuple[TaxonomyClass, ...] = Field(min_length=2)
    top_k: int = Field(5, ge=1)
    # multi_label only: the threshold of classes that set none.
    threshold: float | None = Field(None, ge=0.0, le=1.0)
    negative_templates: tuple[str, ...] = Field(DEFAULT_NEGATIVE_TEMPLATES, min_length=1)
    # Routing rules as written (name, topic, when, headers, priority); parsed into `route_table`.
    routes: tuple[dict[str, Any], ...] = ()
    _route_table: RouteTable = PrivateAttr(default_factory=RouteTable)

    @field_validator("routes", mode="before")
    @classmethod
    def _no_routes(cls, value: Any) -> Any:
        # `routes:` with nothing under it is YAML null: no rules, not an error.
        return () if value is None else value

    @field_validator("classes", mode="before")
    @classmethod
    def _class_shorthand(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"name": item} if isinstance(item, str) else item for item in value]
        return value

    @field_validator("templates", "negative_templates")
    @classmethod
    def _one_placeholder(cls, templates: tuple[str, ...]) -> tuple[str, ...]:
        for template in templates:
            if template.count("{}") != 1:
                raise ValueError(f"template {template!r} must contain exactly one '{{}}'")
        return templates

    @model_validator(mode="after")
    def _unique_class_names(self) -> Taxonomy:
        seen: set[str] = set()
        for index, item in enumerate(self.classes):
            if item.name in seen:
                raise FieldProblem(("classes", index, "name"), f"class name {item.name!r} appears more than once")
            seen.add(item.name)
        return self

    @model_validator(mode="after")
    def _multi_label_fields_need_multi_label(self) -> Taxonomy:
        # A threshold in a single-label file almost always means a forgotten
        # `mode: multi_label`; silently ignoring it would hide that.
        if self.mode == "multi_label":
            return self
        if self.threshold is not None:
            raise FieldProblem(("threshold",), "only applies when mode is multi_label")
        for index, item in enumerate(self.classes):
            for field in ("threshold", "negative_prompts"):
                if getattr(item, field):
                    raise FieldProblem(("classes", index, field), "only applies when mode is multi_label")
        return self

    @model_validator(mode="after")
    def _parse_routes(self, info: ValidationInfo) -> Taxonomy:
        # Raises TaxonomyError (not ValueError), which pydantic lets through
        # untouched: its message already names the file, rule, line and column.
        context = info.context or {}
        self._route_table = parse_routes(
            list(self.routes), self.class_names, context.get("source", "<taxonomy>"), context.get("route_lines")
        )
        return self

    @property
    def route_table(self) -> RouteTable:
        return self._route_table

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def effective_top_k(self) -> int:
        return min(self.top_k, len(self.classes))

    @property
    def is_multi_label(self) -> bool:
        return self.mode == "multi_label"

    def threshold_of(self, item: TaxonomyClass) -> float:
        if item.threshold is not None:
            return item.threshold
        return DEFAULT_THRESHOLD if self.threshold is None else self.threshold

    def positive_texts(self, item: TaxonomyClass) -> list[str]:
        return [fill_template(t, p) for p in item.expanded_prompts() for t in self.templates]

    def negative_texts(self, item: TaxonomyClass) -> list[str]:
        """The prompts a multi-label class is weighed against.

        Own negative prompts go through the same templates as the positives;
        without them, the negative templates wrap the class's own prompts.
        """
        if item.negative_prompts:
            return [fill_template(t, p) for p in item.negative_prompts for t in self.templates]
        return [fill_template(t, p) for p in item.expanded_prompts() for t in self.negative_templates]

    def prompt_count(self) -> int:
        """How many texts the text tower encodes to build this taxonomy's classifier."""
        positives = sum(len(c.expanded_prompts()) for c in self.classes) * len(self.templates)
        if not self.is_multi_label:
            return positives
        return positives + sum(len(self.negative_texts(c)) for c in self.classes)

    def version(self, model_identity: str) -> str:
        """Content hash of the normalised taxonomy and the model it is scored with.

        Normalising through the model (sorted keys, shorthand expanded) means
        cosmetic YAML edits such as comments or key order keep the version.

        Routes are part of it: a route edit changes what is published for the
        same image, so it must change the version that keys the dedupe cache
        (and makes hot reload swap the classifier in). Without routes the key
        is left out, so taxonomies that have none keep their earlier versions.
        """
        document = self.model_dump(mode="json", exclude=None if self.routes else {"routes"})
        canonical = json.dumps(
            {"taxonomy": document, "model": model_identity},
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def fill_template(template: str, prompt: str) -> str:
    # str.replace, not str.format, so braces inside a prompt are harmless.
    return template.replace("{}", prompt, 1)


def load_taxonomy(path: Path) -> Taxonomy:
    """Load and validate a taxonomy file; errors name the file, field and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TaxonomyError(f"taxonomy file {path}: cannot read: {exc}") from exc
    return parse_taxonomy(text, source=str(path))


def parse_taxonomy(text: str, source: str = "<taxonomy>") -> Taxonomy:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TaxonomyError(f"taxonomy file {source}: not valid YAML: {exc}") from exc
    if not isinstance(document, dict):
        raise TaxonomyError(f"taxonomy file {source}: top level must be a mapping with name, templates, classes")
    context = {"source": source, "route_lines": _route_lines(document, node)}
    try:
        return Taxonomy.model_validate(document, context=context)
    except ValidationError as exc:
        raise TaxonomyError(f"taxonomy file {source}: {_describe(exc, node)}") from exc


def _route_lines(document: dict[str, Any], node: yaml.Node | None) -> dict[int, dict[str, int | None]]:
    """Per rule (1-based), the line of the rule ("") and of each of its fields, for routing's messages."""
    rules = document.get("routes")
    if not isinstance(rules, list):
        return {}
    return {
        index + 1: {key: _line_of(node, ("routes", index, key) if key else ("routes", index)) for key in _ROUTE_KEYS}
        for index in range(len(rules))
    }


def _describe(exc: ValidationError, node: yaml.Node | None) -> str:
    problems = []
    errors = exc.errors()
    for err in errors:
        loc = tuple(err["loc"])
        if _follows_from_another(err, errors):
            continue
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, FieldProblem):
            loc, err["msg"] = loc + cause.loc, str(cause)
        field = ".".join(str(p) for p in loc) or "<root>"
        line = _line_of(node, loc)
        where = f" (line {line})" if line else ""
        problems.append(f"field '{field}'{where}: {err['msg']}")
    return "; ".join(problems)


def _follows_from_another(err: Any, errors: list[Any]) -> bool:
    """A list whose items all failed is also reported as too short; the item errors say more."""
    loc = tuple(err["loc"])
    return err["type"] == "too_short" and any(tuple(e["loc"])[: len(loc)] == loc and e is not err for e in errors)


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """Walk the YAML node tree along a pydantic error location to find a line."""
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            break
        if node is None:
            break
        line = node.start_mark.line + 1
    return line


def imagenet_taxonomy() -> Taxonomy:
    """ImageNet-1k with open_clip's class names and 80 OpenAI templates."""
    import open_clip

    templates = tuple(t("{}") if callable(t) else t for t in open_clip.OPENAI_IMAGENET_TEMPLATES)
    classes = tuple(_unique_classes(open_clip.IMAGENET_CLASSNAMES))
    return Taxonomy(name=BUILTIN_IMAGENET, templates=templates, classes=classes, top_k=5)


def _unique_classes(names: list[str]) -> list[TaxonomyClass]:
    """open_clip's ImageNet names repeat 'missile' and 'sunglasses'.

    Labels must be unique, so a repeat gets its class index as a suffix while
    its prompt stays the original name, which keeps the text features, and so
    the scores, identical to open_clip's.
    """
    seen: set[str] = set()
    classes = []
    for index, name in enumerate(names):
        label = name if name not in seen else f"{name} ({index})"
        seen.add(name)
        classes.append(TaxonomyClass(name=label, prompts=(name,)))
    return classes


def everyday_taxonomy_path() -> Path:
    """The small ~20-class taxonomy the demo uses, shipped with the package."""
    return _DATA_DIR / "everyday.yaml"


def resolve_taxonomy(path: Path | None) -> Taxonomy:
    return imagenet_taxonomy() if path is None else load_taxonomy(path)
