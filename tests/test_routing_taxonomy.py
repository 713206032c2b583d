"""Routes inside taxonomies: loading, versions, what the conditions see, the CLI, the schema and the publisher.

The condition language itself is tested in tests/test_routing.py; the whole
worker, crashes included, in tests/test_routing_e2e.py. Here: pure functions,
plus the publisher against the real broker (headers must survive Kafka).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from kafka import KafkaProducer, TopicPartition
from prometheus_client import REGISTRY
from worker_process import read_all

from consumers.offsets import Ticket
from consumers.publisher import OutputPublisher, require_route_topics
from consumers.route_topics import RouteTopicCheck
from consumers.records import Outcome, WorkItem
from labelstream import taxonomy_cli
from labelstream.schema_dump import all_schemas
from pipeline.classifier import ZeroShotClassifier, build_classifier
from pipeline.classifier_cache import ClassifierCache
from pipeline.config import ImageSettings, KafkaSettings, ModelSettings, TaxonomySettings, TopicSettings
from pipeline.dedupe import DedupeCache
from pipeline.errors import ConfigError, TaxonomyError
from pipeline.labeler import ImageLabels, Labeler, PreparedImage
from pipeline.model import load_model
from pipeline.registry import ClassifierRegistry
from pipeline.routing import ERROR_CODE
from pipeline.taxonomy import Taxonomy, load_taxonomy, parse_taxonomy
from pipeline.taxonomy_reload import TaxonomyReloader
from schemas.labels import LabelRecord, ModelRef
from schemas.requests import ImageSource, Request
from schemas.routes import PRIORITY_HEADER, ROUTE_HEADER, RoutedRecord

MODEL = "tiny@abc|random-init"
REPO_ROOT = Path(__file__).resolve().parent.parent

TRIAGE = """\
name: triage
top_k: 1
templates: ["a photo of {}."]
classes: [sexual, violence, safe]
routes:
  - name: block
    topic: t.block
    when: score("violence") >= 0.4
    priority: 90
    headers: {queue: urgent}
  - name: review
    topic: t.review
    when: max_score("sexual", "violence") >= 0.25 and not label("safe")
  - name: allow
    topic: t.allow
    when: label("safe")
"""


def triage(text: str = TRIAGE, mode: str | None = None) -> Taxonomy:
    document = yaml.safe_load(text)
    if mode:
        document["mode"] = mode
    return parse_taxonomy(yaml.safe_dump(document, sort_keys=False))


def classifier_for(taxonomy: Taxonomy) -> ZeroShotClassifier:
    """Identity text weights and logit scale 1: an image whose features are log(p) scores exactly p."""
    n = len(taxonomy.classes)
    negative = torch.zeros(n, n) if taxonomy.is_multi_label else None
    return ZeroShotClassifier(taxonomy, taxonomy.version(MODEL), torch.eye(n), 1.0, 0.0, negative)


def labels_for(classifier: ZeroShotClassifier, logits: list[float]) -> ImageLabels:
    """What the worker computes for one image once the model has its features."""
    return Labeler._score(torch.tensor(logits), classifier)


def single(*probabilities: float) -> list[float]:
    """Features whose single-label scores are exactly these probabilities."""
    return [float(np.log(p)) for p in probabilities]


# -- loading -----------------------------------------------------------------------------------


def test_routes_are_parsed_when_the_taxonomy_loads(tmp_path: Path) -> None:
    path = tmp_path / "triage.yaml"
    path.write_text(TRIAGE)
    table = load_taxonomy(path).route_table
    assert [r.name for r in table.rules] == ["block", "review", "allow"]
    assert table.topics == ("t.block", "t.review", "t.allow")
    assert table.rules[0].priority == 90 and table.rules[0].headers == {"queue": "urgent"}
    assert not parse_taxonomy(TRIAGE.split("routes:")[0] + "routes:\n").route_table.rules


@pytest.mark.parametrize(
    ("bad_when", "column", "problem"),
    [
        ('score("violent") >= 0.4', 7, "unknown class 'violent'"),
        ('score("violence") => 0.4', 19, "unexpected '='"),
        ('score("violence") >= 0.4 and', 29, "ends where a value was expected"),
        ('__import__("os")', 1, "unknown name '__import__'"),
    ],
)
def test_a_bad_rule_is_refused_at_load_naming_file_rule_line_and_column(
    tmp_path: Path, bad_when: str, column: int, problem: str
) -> None:
    path = tmp_path / "triage.yaml"
    path.write_text(TRIAGE.replace("""when: score("violence") >= 0.4""", f"when: '{bad_when}'"))
    line = 1 + path.read_text().splitlines().index(f"    when: '{bad_when}'")
    with pytest.raises(TaxonomyError) as caught:
        load_taxonomy(path)
    message = caught.value.message
    assert caught.value.code == ERROR_CODE
    assert message.startswith(f"taxonomy file {path}: route 'block' (rule 1, line {line}): at column {column}: ")
    assert problem in message


def test_a_rule_of_the_wrong_shape_is_refused_with_its_field_and_line(tmp_path: Path) -> None:
    with pytest.raises(TaxonomyError) as caught:
        parse_taxonomy(TRIAGE.replace("priority: 90", "priority: high"), source="triage.yaml")
    assert "route 'block' (rule 1, line 9): 'priority' must be an integer" in caught.value.message
    with pytest.raises(TaxonomyError) as caught:
        parse_taxonomy(TRIAGE.replace("headers: {queue: urgent}", "headers: {labelstream-route: x}"), source="t.yaml")
    assert "names starting with 'labelstream' are set by labelstream" in caught.value.message
    with pytest.raises(TaxonomyError) as caught:
        parse_taxonomy(TRIAGE + "  - just a string\n", source="triage.yaml")
    assert "field 'routes.3' (line 17)" in caught.value.message


def test_route_edits_change_the_version_and_taxonomies_without_routes_keep_theirs() -> None:
    base = triage()
    without = TRIAGE.split("routes:")[0]
    assert triage(TRIAGE.replace(">= 0.4", ">= 0.5")).version(MODEL) != base.version(MODEL)
    assert triage(TRIAGE.replace("t.allow", "t.other")).version(MODEL) != base.version(MODEL)
    assert triage(TRIAGE.replace("priority: 90", "priority: 91")).version(MODEL) != base.version(MODEL)
    # Cosmetic: key order inside a rule.
    reordered = TRIAGE.replace('    topic: t.allow\n    when: label("safe")', '    when: label("safe")\n    topic: t.allow')
    assert reordered != TRIAGE and parse_taxonomy(reordered).version(MODEL) == base.version(MODEL)
    # No routes, `routes:` (null) and `routes: []` are one version, that of a file without the key.
    plain = parse_taxonomy(without).version(MODEL)
    assert parse_taxonomy(without + "routes:\n").version(MODEL) == plain
    assert parse_taxonomy(without + "routes: []\n").version(MODEL) == plain


# -- what a condition sees ----------------------------------------------------------------------


def test_score_sees_every_class_not_only_the_listed_top_k_and_label_means_listed() -> None:
    classifier = classifier_for(triage())
    # violence is not listed (top_k 1 lists sexual) but its score still decides "block".
    routed = labels_for(classifier, single(0.55, 0.41, 0.04))
    assert [name for name, _ in routed.labels] == ["sexual"]
    assert routed.route is not None and routed.route.rule == "block" and routed.route.topic == "t.block"
    assert routed.route.scores == pytest.approx({"violence": 0.41})
    assert routed.route.priority == 90 and routed.route.headers == {"queue": "urgent"}
    assert routed.route.condition == 'score("violence") >= 0.4'
    # Top-1 is safe: label("safe") holds, so review's `not label("safe")` fails and allow matches.
    allowed = labels_for(classifier, single(0.30, 0.29, 0.41))
    assert allowed.route is not None and allowed.route.rule == "allow"
    assert allowed.route.scores == pytest.approx({"safe": 0.41})
    # Neither block nor label("safe"): the max of sexual and violence decides.
    reviewed = labels_for(classifier, single(0.45, 0.30, 0.25))
    assert reviewed.route is not None and reviewed.route.rule == "review"


def test_no_rule_matching_gives_no_route_and_a_taxonomy_without_routes_never_routes() -> None:
    only_block = triage(TRIAGE.split("  - name: review")[0])
    assert labels_for(classifier_for(only_block), single(0.5, 0.3, 0.2)).route is None
    plain = parse_taxonomy(TRIAGE.split("routes:")[0])
    assert labels_for(classifier_for(plain), single(0.1, 0.8, 0.1)).route is None


def test_multi_label_label_means_selected_over_threshold() -> None:
    text = TRIAGE.replace("top_k: 1", "top_k: 3\nthreshold: 0.6")
    classifier = classifier_for(triage(text, mode="multi_label"))
    # Negative weights are zero, so a class's score is sigmoid(feature): 0.2 / 0.3 / 0.65.
    logits = [float(np.log(p / (1 - p))) for p in (0.2, 0.3, 0.65)]
    result = labels_for(classifier, logits)
    assert result.selected is not None and [n for n, _ in result.selected] == ["safe"]
    assert result.route is not None and result.route.rule == "allow"
    below = [float(np.log(p / (1 - p))) for p in (0.2, 0.3, 0.55)]
    # safe is listed in top_k (3 of 3) but below its threshold: not a label, so review matches.
    assert labels_for(classifier, below).route.rule == "review"  # type: ignore[union-attr]


def test_a_route_edit_never_serves_a_stale_route_from_the_dedupe_cache() -> None:
    before = classifier_for(triage())
    after = classifier_for(triage(TRIAGE.replace('score("violence") >= 0.4', 'score("violence") >= 0.9')))
    # No model: only the dedupe lookup and the classifier's matrix product run here.
    labeler = Labeler(None, ClassifierRegistry([before]), ImageSettings(),  # type: ignore[arg-type]
                      preprocessor=object(), dedupe=DedupeCache(16))  # type: ignore[arg-type]
    first = labels_for(before, single(0.55, 0.41, 0.04))
    labeler.remember("image-key", first)
    assert labeler._cached_labels("image-key", before) is first
    fresh = labeler._cached_labels("image-key", after)
    assert fresh is not None and fresh.taxonomy.version == after.version
    assert first.route.rule == "block" and fresh.route.rule == "review"  # type: ignore[union-attr]


# -- the command line and the schema ----------------------------------------------------------------


def test_validate_counts_routes_and_reports_a_bad_rule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(TRIAGE)
    bad.write_text(TRIAGE.replace('    when: label("safe")\n', '    when: label("safe") or score("nudity") > 0.1\n'))
    assert taxonomy_cli.validate([good, bad]) == 1
    out, err = capsys.readouterr()
    assert f"ok: {good}: triage (single_label, 3 classes, 3 prompts, 3 routes)" in out
    assert f"error: taxonomy file {bad}: route 'allow' (rule 3, line 16): at column 24: unknown class 'nudity'" in err


def test_show_lists_the_routes_in_order(
    tmp_path: Path, tiny_model: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "triage.yaml"
    path.write_text(TRIAGE)
    monkeypatch.setenv("LABELSTREAM_TAXONOMY__PATH", str(path))
    monkeypatch.setenv("LABELSTREAM_MODEL__NAME", str(tiny_model.config_path))
    monkeypatch.setenv("LABELSTREAM_MODEL__PRETRAINED", str(tiny_model.checkpoint_path))
    assert taxonomy_cli.show("triage", as_json=False, config_file=None) == 0
    text = capsys.readouterr().out
    assert "routes:    3 (first match wins)" in text
    assert '  1. block -> t.block  when score("violence") >= 0.4  [priority 90]  [headers queue=urgent]' in text
    assert '  3. allow -> t.allow  when label("safe")' in text
    assert taxonomy_cli.show("triage", as_json=True, config_file=None) == 0
    routes = json.loads(capsys.readouterr().out)["routes"]
    assert [(r["name"], r["topic"], r["priority"]) for r in routes] == [
        ("block", "t.block", 90), ("review", "t.review", None), ("allow", "t.allow", None)]


def test_the_schema_command_documents_the_routed_record() -> None:
    schemas = all_schemas()
    routed = schemas["routed_record"]
    assert set(routed["required"]) == {"id", "route", "condition", "label"}
    assert {"priority", "scores", "headers", "image"} <= set(routed["properties"])
    assert "route" in schemas["label_record"]["properties"]


def test_start_up_refuses_missing_route_topics_naming_each() -> None:
    classifier = classifier_for(triage())
    require_route_topics({"t.block", "t.review", "t.allow"}, [classifier])
    with pytest.raises(ConfigError) as caught:
        require_route_topics({"t.block"}, [classifier])
    assert caught.value.code == "config.route_topic_missing"
    assert "t.review (route 'review' of taxonomy 'triage'); t.allow (route 'allow' of taxonomy 'triage')" in caught.value.message


def test_a_reload_whose_route_topic_is_missing_is_rejected_and_the_live_version_keeps_serving(
    broker: Any, new_topic: Callable[..., str], tiny_model: Any,
) -> None:
    """The reloader asks the real broker before a hot-reloaded taxonomy with routes goes live."""
    block, review, allow = new_topic(1), new_topic(1), new_topic(1)
    text = TRIAGE.replace("t.block", block).replace("t.review", review).replace("t.allow", allow)
    model = load_model(ModelSettings(name=str(tiny_model.config_path), pretrained=str(tiny_model.checkpoint_path),
                                     device="cpu"))
    registry = ClassifierRegistry([build_classifier(model, parse_taxonomy(text.replace("top_k: 1", "top_k: 2")))])
    check = RouteTopicCheck(KafkaSettings(bootstrap_servers=broker.bootstrap))
    reloader = TaxonomyReloader(model, registry, ClassifierCache(None), TaxonomySettings(watch_interval_s=0),
                                admit=check)
    try:
        live = registry.get("triage").version
        assert not reloader.apply_document("triage", text.replace(review, "ls-no-such-topic"))
        assert registry.get("triage").version == live
        assert reloader.apply_document("triage", text)
        assert registry.get("triage").version != live
    finally:
        check.close()


# -- the publisher, against the real broker ----------------------------------------------------------


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def outcome_for(classifier: ZeroShotClassifier, request_id: str, offset: int, logits: list[float]) -> Outcome:
    request = Request(id=request_id, image=ImageSource.model_validate({"s3": {"bucket": "bkt", "key": f"{request_id}.jpg"}}))
    item = WorkItem(ticket=Ticket(TopicPartition("requests", 0), offset, 1), topic="requests", partition=0,
                    offset=offset, key=request_id.encode(), value=b"{}", timestamp_ms=None, headers=[],
                    log=_NullLog(), request=request, classifier=classifier,
                    prepared=PreparedImage(pixels=None, fetch_ms=1.0, decode_ms=1.0))
    return Outcome(item, labels=labels_for(classifier, logits))


class _NullLog:
    def info(self, *args: Any, **kwargs: Any) -> None:
        pass


def test_publisher_sends_the_routed_record_with_headers_and_counts_routes(
    broker: Any, new_topic: Callable[..., str]
) -> None:
    block, review, allow = new_topic(1), new_topic(1), new_topic(1)
    text = TRIAGE.replace("t.block", block).replace("t.review", review).replace("t.allow", allow)
    classifier = classifier_for(triage(text.split("  - name: allow")[0]))
    topics = TopicSettings(labels=new_topic(1), embeddings=new_topic(1), dlq=new_topic(1))
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    publisher = OutputPublisher(producer, topics, ModelRef(name="m", pretrained=None), 10.0, "grp")
    before = (counter("labelstream_routed_total", taxonomy="triage", route="block"),
              counter("labelstream_unrouted_total", taxonomy="triage"))
    try:
        publisher.publish(outcome_for(classifier, "hit", 1, single(0.55, 0.41, 0.04)))
        publisher.publish(outcome_for(classifier, "miss", 2, single(0.10, 0.10, 0.80)))
        publisher.wait_for_acks()
    finally:
        producer.close()
    labels = {json.loads(r.value)["id"]: LabelRecord.model_validate_json(r.value) for r in read_all(broker.bootstrap, topics.labels)}
    assert labels["hit"].route == "block" and labels["miss"].route is None
    (routed,) = read_all(broker.bootstrap, block)
    assert read_all(broker.bootstrap, review) == []
    assert routed.key == b"hit"
    assert dict(routed.headers) == {ROUTE_HEADER: b"block", PRIORITY_HEADER: b"90", "queue": b"urgent"}
    record = RoutedRecord.model_validate_json(routed.value)
    assert (record.id, record.route, record.priority, record.condition) == ("hit", "block", 90, 'score("violence") >= 0.4')
    assert record.scores == pytest.approx({"violence": 0.41})
    assert record.image is not None and record.image.s3 is not None and record.image.s3.key == "hit.jpg"
    assert record.label == labels["hit"]
    assert counter("labelstream_routed_total", taxonomy="triage", route="block") == before[0] + 1
    assert counter("labelstream_unrouted_total", taxonomy="triage") == before[1] + 1


def test_the_readme_example_is_the_example_file_and_routes_as_the_issue_says() -> None:
    example = load_taxonomy(REPO_ROOT / "examples" / "moderation.yaml")
    section = (REPO_ROOT / "README.md").read_text().split("\n## Moderation triage\n", 1)[1].split("\n## ", 1)[0]
    shown = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert parse_taxonomy(shown).version(MODEL) == example.version(MODEL)

    def route(labels: frozenset[str] = frozenset(), **given: float) -> str | None:
        match = example.route_table.route({c: given.get(c, 0.0) for c in example.class_names}, labels)
        return None if match is None else match.rule

    assert route(sexual=0.9) == "block" and route(violence=0.95) == "block"
    assert route(violence=0.89) == "review" and route(weapons=0.4) == "review"
    assert route(frozenset({"weapons"}), weapons=0.3) == "review"
    assert route(sexual=0.39, safe=0.9) == "allow"
