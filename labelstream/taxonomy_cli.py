"""`labelstream taxonomy validate|show|publish`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kafka.errors import KafkaError

from consumers.kafka_clients import build_producer
from pipeline.classifier_cache import ClassifierCache
from pipeline.config import Settings, load_settings
from pipeline.errors import ConfigError, PublishError, TaxonomyError
from pipeline.model import resolve_source
from pipeline.routing import RouteRule
from pipeline.taxonomy import Taxonomy, load_taxonomy
from pipeline.taxonomy_store import find_configured


def validate(files: list[Path]) -> int:
    """Check every file; print each problem with its file, field and line. Exit 1 if any is invalid."""
    failed = 0
    defined_by: dict[str, Path] = {}
    for path in files:
        try:
            taxonomy = load_taxonomy(path)
            _require_new_name(taxonomy, path, defined_by)
        except TaxonomyError as exc:
            failed += 1
            print(f"error: {exc.message}", file=sys.stderr)
            continue
        print(f"ok: {path}: {_summary(taxonomy)}")
    return 1 if failed else 0


def show(name: str, as_json: bool, config_file: Path | None) -> int:
    """Print a configured taxonomy, its version for the configured model, and whether its classifier is cached."""
    settings = load_settings(config_file)
    taxonomy = find_configured(settings.taxonomy, name)
    # resolve_source identifies the model from its config and checkpoint files without loading weights.
    identity = resolve_source(settings.model).identity
    details = _details(taxonomy, identity, ClassifierCache(settings.taxonomy.cache_dir))
    print(json.dumps(details, indent=2) if as_json else _render(details))
    return 0


def publish(path: Path, config_file: Path | None) -> int:
    """Validate a taxonomy file and write it to the taxonomies topic, keyed by its name."""
    settings = load_settings(config_file)
    taxonomy = load_taxonomy(path)
    metadata = _produce(settings, taxonomy.name, path.read_bytes())
    version = _version_or_none(settings, taxonomy)
    suffix = f" version {version}" if version else ""
    print(f"published {taxonomy.name}{suffix} to {metadata.topic} partition {metadata.partition} offset {metadata.offset}")
    return 0


def _produce(settings: Settings, key: str, value: bytes):  # type: ignore[no-untyped-def]
    producer = build_producer(settings.kafka, acks="all")
    try:
        future = producer.send(settings.topics.taxonomies, key=key.encode("utf-8"), value=value)
        return future.get(timeout=settings.kafka.produce_timeout_s)
    except KafkaError as exc:
        raise PublishError(f"taxonomy {key!r} was not acknowledged by {settings.topics.taxonomies}: {exc}") from exc
    finally:
        producer.close(timeout=settings.kafka.produce_timeout_s)


def _version_or_none(settings: Settings, taxonomy: Taxonomy) -> str | None:
    # Publishing needs no model; the version is only shown when the model is resolvable here.
    try:
        return taxonomy.version(resolve_source(settings.model).identity)
    except ConfigError:
        return None


def _require_new_name(taxonomy: Taxonomy, path: Path, defined_by: dict[str, Path]) -> None:
    if taxonomy.name in defined_by:
        raise TaxonomyError(f"taxonomy file {path}: field 'name': {taxonomy.name!r} is already defined by {defined_by[taxonomy.name]}")
    defined_by[taxonomy.name] = path


def _summary(taxonomy: Taxonomy) -> str:
    routes = len(taxonomy.route_table.rules)
    suffix = f", {routes} route{'s' if routes != 1 else ''}" if routes else ""
    counts = f"{len(taxonomy.classes)} classes, {taxonomy.prompt_count()} prompts{suffix}"
    return f"{taxonomy.name} ({taxonomy.mode}, {counts})"


def _details(taxonomy: Taxonomy, identity: str, cache: ClassifierCache) -> dict[str, object]:
    version = taxonomy.version(identity)
    entry = cache.entry_path(identity, taxonomy, version)
    return {
        "name": taxonomy.name,
        "mode": taxonomy.mode,
        "version": version,
        "model_identity": identity,
        "prompts": taxonomy.prompt_count(),
        "top_k": taxonomy.top_k,
        "cached": cache.contains(identity, taxonomy),
        "cache_path": str(entry) if entry else None,
        "classes": [_class_details(taxonomy, index) for index in range(len(taxonomy.classes))],
        "routes": [_route_details(rule) for rule in taxonomy.route_table.rules],
    }


def _route_details(rule: RouteRule) -> dict[str, object]:
    return {"name": rule.name, "topic": rule.topic, "when": rule.text, "priority": rule.priority,
            "headers": dict(rule.headers)}


def _class_details(taxonomy: Taxonomy, index: int) -> dict[str, object]:
    item = taxonomy.classes[index]
    details: dict[str, object] = {"name": item.name, "prompts": list(item.expanded_prompts())}
    if taxonomy.is_multi_label:
        details["threshold"] = taxonomy.threshold_of(item)
        details["negative_prompts"] = list(item.negative_prompts)
    return details


def _render(details: dict[str, object]) -> str:
    cache = "cache disabled (set taxonomy.cache_dir)" if details["cache_path"] is None else (
        f"{'yes' if details['cached'] else 'no'} ({details['cache_path']})")
    lines = [
        f"name:      {details['name']}",
        f"mode:      {details['mode']}",
        f"version:   {details['version']}",
        f"model:     {details['model_identity']}",
        f"prompts:   {details['prompts']}",
        f"cached:    {cache}",
        f"classes:   {len(details['classes'])}",  # type: ignore[arg-type]
    ]
    lines += [f"  - {_class_line(c)}" for c in details["classes"]]  # type: ignore[union-attr]
    routes: list[dict[str, object]] = details["routes"]  # type: ignore[assignment]
    lines.append(f"routes:    {len(routes) or 'none'}{' (first match wins)' if routes else ''}")
    lines += [f"  {index}. {_route_line(route)}" for index, route in enumerate(routes, start=1)]
    return "\n".join(lines)


def _route_line(route: dict[str, object]) -> str:
    line = f"{route['name']} -> {route['topic']}  when {route['when']}"
    if route["priority"] is not None:
        line += f"  [priority {route['priority']}]"
    headers: dict[str, str] = route["headers"]  # type: ignore[assignment]
    if headers:
        line += "  [headers " + ", ".join(f"{k}={v}" for k, v in headers.items()) + "]"
    return line


def _class_line(details: dict[str, object]) -> str:
    line = f"{details['name']}: {', '.join(details['prompts'])}"  # type: ignore[arg-type]
    if "threshold" in details:
        line += f"  [threshold {details['threshold']}]"
        if details["negative_prompts"]:
            line += f"  [not: {', '.join(details['negative_prompts'])}]"  # type: ignore[arg-type]
    return line
