"""Taxonomies as a live, versioned part of the worker: multi-label scoring, the classifier
cache, the registry's swaps and hot reload. Unit level, with the tiny model; the
end-to-end versions of these run in test_taxonomy_e2e.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog
import torch
from kafka import KafkaProducer
from prometheus_client import REGISTRY

from consumers.taxonomy_feed import TaxonomyFeed, build_feed_consumer
from labelstream.cli import main as cli_main
from labelstream.embedded import create_topic
from pipeline import classifier_cache, taxonomy_reload
from pipeline.classifier import build_classifier
from pipeline.classifier_cache import ClassifierCache, load_or_build
from pipeline.config import ImageSettings, KafkaSettings, ModelSettings, Settings, TaxonomySettings
from pipeline.errors import ConfigError, TaxonomyError
from pipeline.labeler import Labeler, build_labeler
from pipeline.model import LoadedModel, load_model
from pipeline.registry import ClassifierRegistry
from pipeline.taxonomy import BUILTIN_IMAGENET, DEFAULT_THRESHOLD, parse_taxonomy
from pipeline.taxonomy_reload import TaxonomyReloader
from pipeline.taxonomy_store import configured_files, default_name, load_configured

ANIMALS = """\
name: animals
mode: multi_label
templates: ["a photo of a {}.", "a close-up photo of a {}."]
top_k: 2
threshold: 0.45
classes:
  - name: dog
    prompts: [dog, puppy]
    negative_prompts: [wolf, fox]
    threshold: 0.6
  - name: cat
    negative_prompts: [lion]
  - name: flower
"""

SCENES = """\
name: scenes
templates: ["a photo of a {}."]
top_k: 2
classes: [beach, city street, mountain]
"""


# -- fixtures ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tiny_model: Any) -> LoadedModel:
    settings = ModelSettings(name=str(tiny_model.config_path), pretrained=str(tiny_model.checkpoint_path), device="cpu")
    return load_model(settings)


@pytest.fixture(scope="module")
def photo_features(model: LoadedModel, sample_photos: list[Path]) -> torch.Tensor:
    labeler = Labeler(model, ClassifierRegistry([build_classifier(model, parse_taxonomy(SCENES))]), ImageSettings())
    pixels = [labeler.prepare_bytes(p.read_bytes()).pixels for p in sample_photos[:6]]
    return model.encode_images(torch.stack(pixels))


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """Structured log events of the cache and the reloader.

    Fresh logger proxies: a proxy cached by an earlier in-process configure_logging
    would keep writing to stderr and miss the capture.
    """
    with structlog.testing.capture_logs() as captured:
        for module in (classifier_cache, taxonomy_reload):
            monkeypatch.setattr(module, "log", structlog.get_logger("test"))
        yield captured


def named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == name]


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- multi-label scoring, computed by hand -------------------------------------------


def mean_text_embedding(model: LoadedModel, texts: list[str]) -> np.ndarray:
    """open_clip's recipe, straight on the open_clip model: normalise, average, re-normalise."""
    with torch.no_grad():
        features = model.model.encode_text(model.tokenizer(texts)).double()
    features = features / features.norm(dim=-1, keepdim=True)
    mean = features.mean(dim=0)
    return (mean / mean.norm()).numpy()


def hand_scores(model: LoadedModel, features: torch.Tensor) -> dict[str, np.ndarray]:
    templates = ["a photo of a {}.", "a close-up photo of a {}."]
    fill = lambda words: [t.replace("{}", w) for w in words for t in templates]  # noqa: E731
    pairs = {
        "dog": (fill(["dog", "puppy"]), fill(["wolf", "fox"])),
        "cat": (fill(["cat"]), fill(["lion"])),
        # No negatives of its own: its prompts wrapped in the default negative template.
        "flower": (fill(["flower"]), ["a photo of something that is not a flower."]),
    }
    scale, f = model.logit_scale, features.double().numpy()
    scores = {}
    for name, (positives, negatives) in pairs.items():
        pos = scale * f @ mean_text_embedding(model, positives)
        neg = scale * f @ mean_text_embedding(model, negatives)
        scores[name] = np.exp(pos) / (np.exp(pos) + np.exp(neg))
    return scores


def test_multi_label_score_is_the_two_way_softmax_of_positive_and_negative(
    model: LoadedModel, photo_features: torch.Tensor
) -> None:
    classifier = build_classifier(model, parse_taxonomy(ANIMALS))
    ours = classifier.probabilities(photo_features).numpy()
    expected = hand_scores(model, photo_features)
    for column, name in enumerate(classifier.taxonomy.class_names):
        np.testing.assert_allclose(ours[:, column], expected[name], atol=1e-5)
    # Independent decisions: rows need not sum to one, unlike a softmax over classes.
    assert not np.allclose(ours.sum(axis=1), 1.0, atol=1e-3)


def test_selected_holds_exactly_the_classes_at_or_above_their_thresholds(
    model: LoadedModel, photo_features: torch.Tensor
) -> None:
    taxonomy = parse_taxonomy(ANIMALS)
    classifier = build_classifier(model, taxonomy)
    scores = classifier.probabilities(photo_features)
    thresholds = {"dog": 0.6, "cat": 0.45, "flower": 0.45}
    for row, selected, top in zip(
        scores.tolist(), classifier.selected_labels(scores) or [], classifier.top_labels(scores), strict=True
    ):
        by_name = dict(zip(taxonomy.class_names, row, strict=True))
        wanted = sorted(((n, s) for n, s in by_name.items() if s >= thresholds[n]), key=lambda p: -p[1])
        assert selected == wanted
        assert top == sorted(by_name.items(), key=lambda p: -p[1])[:2]


def test_thresholds_fall_back_from_class_to_taxonomy_to_the_global_default() -> None:
    taxonomy = parse_taxonomy(ANIMALS)
    assert [taxonomy.threshold_of(c) for c in taxonomy.classes] == [0.6, 0.45, 0.45]
    plain = parse_taxonomy(ANIMALS.replace("threshold: 0.45\n", ""))
    assert plain.threshold_of(plain.classes[1]) == DEFAULT_THRESHOLD


def test_selected_uses_a_crafted_score_table(model: LoadedModel) -> None:
    classifier = build_classifier(model, parse_taxonomy(ANIMALS.replace("0.45", "0.5")))
    # Binary fractions, so float32 scores equal the thresholds exactly where they should.
    scores = torch.tensor([[0.625, 0.4375, 0.875], [0.59375, 0.5, 0.125]])
    assert classifier.selected_labels(scores) == [[("flower", 0.875), ("dog", 0.625)], [("cat", 0.5)]]


def test_single_label_keeps_the_softmax_over_classes_and_selects_nothing(
    model: LoadedModel, photo_features: torch.Tensor
) -> None:
    import open_clip

    taxonomy = parse_taxonomy(SCENES)
    classifier = build_classifier(model, taxonomy)
    weights = open_clip.build_zero_shot_classifier(
        model.model, model.tokenizer, ["beach", "city street", "mountain"], ["a photo of a {}."], device="cpu"
    )
    expected = (model.logit_scale * photo_features @ weights).softmax(dim=-1)
    torch.testing.assert_close(classifier.probabilities(photo_features), expected, atol=1e-6, rtol=1e-5)
    assert classifier.selected_labels(expected) is None
    assert classifier.negative_weights is None


def test_a_mixed_batch_scores_each_image_with_its_own_taxonomy(
    model: LoadedModel, sample_photos: list[Path]
) -> None:
    animals, scenes = (build_classifier(model, parse_taxonomy(t)) for t in (ANIMALS, SCENES))
    labeler = Labeler(model, ClassifierRegistry([animals, scenes]), ImageSettings())
    pixels = [labeler.prepare_bytes(p.read_bytes()).pixels for p in sample_photos[:2]]
    first, second = labeler.label(pixels, [animals, scenes])
    assert first.taxonomy.name == "animals" and first.selected is not None
    assert {label for label, _ in first.labels} <= {"dog", "cat", "flower"}
    assert second.taxonomy.name == "scenes" and second.selected is None


# -- validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "field", "line"),
    [
        (("    threshold: 0.6", "    threshold: 1.6"), "classes.0.threshold", 10),
        (("negative_prompts: [lion]", "negative_prompts: ['  ']"), "classes.1.negative_prompts", 12),
        (("mode: multi_label", "mode: sometimes"), "mode", 2),
        (("top_k: 2", "top_k: 2\nnegative_templates: ['not a photo']"), "negative_templates", 5),
    ],
)
def test_invalid_multi_label_fields_name_file_field_and_line(
    tmp_path: Path, edit: tuple[str, str], field: str, line: int
) -> None:
    path = tmp_path / "animals.yaml"
    path.write_text(ANIMALS.replace(*edit))
    with pytest.raises(TaxonomyError) as caught:
        load_configured(TaxonomySettings(path=path))
    assert str(path) in caught.value.message
    assert f"field '{field}' (line {line})" in caught.value.message


def test_multi_label_fields_in_a_single_label_taxonomy_are_rejected() -> None:
    text = SCENES.replace("classes: [beach, city street, mountain]", "classes:\n  - name: beach\n    threshold: 0.3\n  - sea")
    with pytest.raises(TaxonomyError, match=r"field 'classes.0.threshold' \(line 6\): only applies when mode is multi_label"):
        parse_taxonomy(text, source="scenes.yaml")


def test_version_follows_thresholds_and_negatives_but_not_formatting(model: LoadedModel) -> None:
    base = parse_taxonomy(ANIMALS).version(model.identity)
    assert parse_taxonomy("# a comment\n" + ANIMALS).version(model.identity) == base
    assert parse_taxonomy(ANIMALS.replace("0.6", "0.7")).version(model.identity) != base
    assert parse_taxonomy(ANIMALS.replace("[lion]", "[tiger]")).version(model.identity) != base


# -- several taxonomies, the default ------------------------------------------------------


def test_a_directory_and_a_path_load_together_with_the_path_as_default(tmp_path: Path) -> None:
    directory = tmp_path / "taxonomies"
    directory.mkdir()
    (directory / "animals.yaml").write_text(ANIMALS)
    (directory / "notes.txt").write_text("not a taxonomy")
    (directory / ".animals.yaml.swp").write_text("editor junk")
    scenes = tmp_path / "scenes.yml"
    scenes.write_text(SCENES)
    settings = TaxonomySettings(dir=directory, path=scenes)
    assert [p.name for p in configured_files(settings)] == ["scenes.yml", "animals.yaml"]
    taxonomies = load_configured(settings)
    assert [t.name for t in taxonomies] == ["scenes", "animals"]
    assert default_name(settings, taxonomies) == "scenes"
    assert default_name(settings.model_copy(update={"default": "animals"}), taxonomies) == "animals"
    with pytest.raises(ConfigError, match="taxonomy.default 'birds'"):
        default_name(settings.model_copy(update={"default": "birds"}), taxonomies)


def test_two_files_with_one_name_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(SCENES)
    (tmp_path / "b.json").write_text('{"name": "scenes", "templates": ["{}"], "classes": ["x", "y"]}')
    with pytest.raises(TaxonomyError, match="already defined by"):
        load_configured(TaxonomySettings(dir=tmp_path))


def test_nothing_configured_means_the_builtin_imagenet_taxonomy() -> None:
    (taxonomy,) = load_configured(TaxonomySettings())
    assert taxonomy.name == BUILTIN_IMAGENET and len(taxonomy.classes) == 1000


def test_settings_read_the_new_taxonomy_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LABELSTREAM_TAXONOMY__DIR", str(tmp_path))
    monkeypatch.setenv("LABELSTREAM_TAXONOMY__DEFAULT", "animals")
    monkeypatch.setenv("LABELSTREAM_TAXONOMY__CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LABELSTREAM_TAXONOMY__WATCH_INTERVAL_S", "0.5")
    monkeypatch.setenv("LABELSTREAM_TAXONOMY__FEED_ENABLED", "false")
    taxonomy = Settings().taxonomy
    assert (taxonomy.dir, taxonomy.default, taxonomy.cache_dir) == (tmp_path, "animals", tmp_path / "cache")
    assert taxonomy.watch_interval_s == 0.5 and taxonomy.feed_enabled is False


# -- the classifier cache ---------------------------------------------------------------


def test_second_build_of_the_same_version_is_a_cache_hit(
    model: LoadedModel, tmp_path: Path, events: list[dict[str, Any]]
) -> None:
    taxonomy = parse_taxonomy(ANIMALS)
    hits, builds = (counter(f"labelstream_classifier_{k}_total", taxonomy="animals") for k in ("cache_hits", "builds"))
    built = load_or_build(model, taxonomy, ClassifierCache(tmp_path))
    loaded = load_or_build(model, taxonomy, ClassifierCache(tmp_path))
    assert counter("labelstream_classifier_builds_total", taxonomy="animals") == builds + 1
    assert counter("labelstream_classifier_cache_hits_total", taxonomy="animals") == hits + 1
    assert [e["event"] for e in events] == ["classifier_built", "classifier_cache_hit"]
    assert loaded.version == built.version
    assert torch.equal(loaded.weights, built.weights)
    assert loaded.negative_weights is not None and torch.equal(loaded.negative_weights, built.negative_weights)
    assert not list(tmp_path.rglob("*.tmp")), "atomic writes must not leave temporary files"


def test_a_new_version_or_another_model_misses_the_cache(model: LoadedModel, tmp_path: Path) -> None:
    cache = ClassifierCache(tmp_path)
    taxonomy = parse_taxonomy(ANIMALS)
    load_or_build(model, taxonomy, cache)
    assert cache.contains(model.identity, taxonomy)
    assert not cache.contains(model.identity, parse_taxonomy(ANIMALS.replace("0.6", "0.65")))
    assert not cache.contains(model.identity + "|other-weights", taxonomy)


def test_a_corrupt_entry_is_rebuilt_not_fatal(model: LoadedModel, tmp_path: Path, events: list[dict[str, Any]]) -> None:
    cache = ClassifierCache(tmp_path)
    taxonomy = parse_taxonomy(SCENES)
    first = load_or_build(model, taxonomy, cache)
    entry = cache.entry_path(model.identity, taxonomy, first.version)
    assert entry is not None
    entry.write_bytes(b"not a tensor file")
    again = load_or_build(model, taxonomy, cache)
    assert torch.equal(again.weights, first.weights)
    assert [e["event"] for e in events] == ["classifier_built", "classifier_cache_invalid", "classifier_built"]


def test_without_a_cache_dir_every_start_builds(model: LoadedModel, events: list[dict[str, Any]]) -> None:
    load_or_build(model, parse_taxonomy(SCENES), ClassifierCache(None))
    load_or_build(model, parse_taxonomy(SCENES), ClassifierCache(None))
    assert [e["event"] for e in events] == ["classifier_built", "classifier_built"]


# -- the registry -------------------------------------------------------------------------


def test_registry_swaps_and_removes_atomically(model: LoadedModel) -> None:
    scenes = build_classifier(model, parse_taxonomy(SCENES))
    animals = build_classifier(model, parse_taxonomy(ANIMALS))
    registry = ClassifierRegistry([scenes], default="scenes")
    assert registry.swap(animals) is None
    newer = build_classifier(model, parse_taxonomy(ANIMALS.replace("0.6", "0.7")))
    assert registry.swap(newer) is animals
    assert registry.get("animals") is newer and registry.get(None) is scenes
    assert registry.remove("animals") and not registry.remove("animals")
    with pytest.raises(TaxonomyError) as unknown:
        registry.get("animals")
    assert unknown.value.code == "taxonomy.unknown"
    with pytest.raises(TaxonomyError, match="default"):
        registry.remove("scenes")


def test_readers_never_see_a_half_swapped_registry(model: LoadedModel) -> None:
    versions = [build_classifier(model, parse_taxonomy(ANIMALS.replace("0.6", f"0.{i}"))) for i in range(1, 4)]
    registry = ClassifierRegistry(versions[:1])
    valid = {id(c): c.version for c in versions}
    seen: list[str] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            classifier = registry.get("animals")
            assert valid[id(classifier)] == classifier.version
            seen.append(classifier.version)

    reader = threading.Thread(target=read)
    reader.start()
    for _ in range(200):
        for classifier in versions:
            registry.swap(classifier)
    stop.set()
    reader.join()
    assert seen and set(seen) <= set(valid.values())


# -- hot reload -------------------------------------------------------------------------------


@pytest.fixture
def live(tmp_path: Path, model: LoadedModel) -> tuple[Path, Labeler, TaxonomyReloader]:
    directory = tmp_path / "taxonomies"
    directory.mkdir()
    (directory / "animals.yaml").write_text(ANIMALS)
    (directory / "scenes.yaml").write_text(SCENES)
    settings = Settings(taxonomy=TaxonomySettings(dir=directory, default="scenes", watch_interval_s=0))
    labeler = build_labeler(settings, model=model)
    reloader = TaxonomyReloader(model, labeler.registry, ClassifierCache(None), settings.taxonomy)
    reloader.start()
    return directory, labeler, reloader


def settle(reloader: TaxonomyReloader) -> None:
    """Two polls: a change is applied once the same content is seen twice."""
    reloader.poll_once()
    reloader.poll_once()


def test_an_edit_goes_live_with_a_new_version(live: Any, model: LoadedModel, events: list[dict[str, Any]]) -> None:
    directory, labeler, reloader = live
    before = labeler.classifier_for("animals")
    edited = ANIMALS.replace("threshold: 0.6", "threshold: 0.7")
    (directory / "animals.yaml").write_text(edited)
    reloader.poll_once()
    assert labeler.classifier_for("animals") is before, "a change seen once may be half-written"
    reloader.poll_once()
    after = labeler.classifier_for("animals")
    assert after.version == parse_taxonomy(edited).version(model.identity) != before.version
    (loaded,) = named(events, "taxonomy_loaded")
    assert (loaded["taxonomy"], loaded["version"], loaded["previous_version"]) == ("animals", after.version, before.version)
    settle(reloader)
    assert len(named(events, "taxonomy_loaded")) == 1, "an unchanged file is not rebuilt"


def test_an_invalid_edit_is_rejected_and_the_old_version_stays(live: Any, events: list[dict[str, Any]]) -> None:
    directory, labeler, reloader = live
    before = labeler.classifier_for("animals")
    rejected_before = counter("labelstream_taxonomy_updates_total", origin="file", outcome="rejected")
    path = directory / "animals.yaml"
    path.write_text(ANIMALS.replace("    threshold: 0.6", "    threshold: high"))
    settle(reloader)
    settle(reloader)
    assert labeler.classifier_for("animals") is before
    (rejected,) = named(events, "taxonomy_rejected")
    assert rejected["file"] == str(path)
    assert "field 'classes.0.threshold' (line 10)" in rejected["error"]
    assert counter("labelstream_taxonomy_updates_total", origin="file", outcome="rejected") == rejected_before + 1


def test_new_files_are_added_and_deleted_files_removed(live: Any, events: list[dict[str, Any]]) -> None:
    directory, labeler, reloader = live
    (directory / "birds.json").write_text('{"name": "birds", "templates": ["a photo of a {}."], "classes": ["owl", "crow"]}')
    settle(reloader)
    assert labeler.classifier_for("birds").taxonomy.class_names == ["owl", "crow"]
    (directory / "birds.json").unlink()
    (directory / "scenes.yaml").unlink()
    reloader.poll_once()
    assert "birds" not in labeler.registry.names()
    assert labeler.classifier_for(None).taxonomy.name == "scenes", "the default is never dropped"
    assert [e["taxonomy"] for e in named(events, "taxonomy_removed")] == ["birds"]
    assert named(events, "taxonomy_remove_refused")


def test_documents_from_the_topic_are_checked_against_their_key(live: Any, model: LoadedModel, events: list[dict[str, Any]]) -> None:
    _, labeler, reloader = live
    assert not reloader.apply_document("birds", SCENES, source="topic[birds]")
    assert "does not match the record key 'birds'" in named(events, "taxonomy_rejected")[0]["error"]
    edited = SCENES.replace("mountain", "forest")
    assert reloader.apply_document("scenes", edited)
    assert labeler.classifier_for("scenes").version == parse_taxonomy(edited).version(model.identity)
    assert reloader.remove_document("animals")
    assert not reloader.remove_document("scenes")
    assert labeler.registry.names() == ["scenes"]


def test_the_watcher_thread_picks_up_edits(tmp_path: Path, model: LoadedModel) -> None:
    path = tmp_path / "scenes.yaml"
    path.write_text(SCENES)
    settings = Settings(taxonomy=TaxonomySettings(path=path, watch_interval_s=0.05))
    labeler = build_labeler(settings, model=model)
    reloader = TaxonomyReloader(model, labeler.registry, ClassifierCache(None), settings.taxonomy)
    reloader.start()
    try:
        path.write_text(SCENES.replace("mountain", "forest"))
        for _ in range(100):
            if "forest" in labeler.classifier_for(None).taxonomy.class_names:
                break
            threading.Event().wait(0.05)
        assert "forest" in labeler.classifier_for(None).taxonomy.class_names
    finally:
        reloader.stop()


# -- the CLI ------------------------------------------------------------------------------------


def test_validate_reports_every_bad_file_with_field_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(ANIMALS)
    bad.write_text(ANIMALS.replace("top_k: 2", "top_k: 0"))
    assert cli_main(["taxonomy", "validate", str(good), str(bad)]) == 1
    out, err = capsys.readouterr()
    assert "ok: " in out and "animals (multi_label, 3 classes" in out
    assert f"taxonomy file {bad}: field 'top_k' (line 4)" in err
    assert cli_main(["taxonomy", "validate", str(good)]) == 0


def test_show_prints_version_prompts_and_cache_state(
    tmp_path: Path, model: LoadedModel, tiny_model: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    path = tmp_path / "animals.yaml"
    path.write_text(ANIMALS)
    for key, value in {
        "TAXONOMY__PATH": str(path), "TAXONOMY__CACHE_DIR": str(tmp_path / "cache"),
        "MODEL__NAME": str(tiny_model.config_path), "MODEL__PRETRAINED": str(tiny_model.checkpoint_path),
    }.items():
        monkeypatch.setenv(f"LABELSTREAM_{key}", value)
    taxonomy = parse_taxonomy(ANIMALS)
    assert cli_main(["taxonomy", "show", "animals", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == taxonomy.version(model.identity)
    assert shown["prompts"] == taxonomy.prompt_count() == (4 + 2 + 2) + (4 + 2 + 1) and shown["cached"] is False
    assert shown["classes"][0] == {"name": "dog", "prompts": ["dog", "puppy"], "threshold": 0.6, "negative_prompts": ["wolf", "fox"]}
    load_or_build(model, taxonomy, ClassifierCache(tmp_path / "cache"))
    assert cli_main(["taxonomy", "show", "animals"]) == 0
    text = capsys.readouterr().out
    assert f"version:   {shown['version']}" in text and "cached:    yes" in text


# -- the taxonomies topic -----------------------------------------------------------------------


class RecordingReloader:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []

    def apply_document(self, name: str, text: str, source: str = "kafka") -> bool:
        self.calls.append((name, text))
        return True

    def remove_document(self, name: str) -> bool:
        self.calls.append((name, None))
        return True


def test_the_feed_catches_up_with_the_latest_document_per_name_then_follows(
    broker: Any, new_topic: Any
) -> None:
    topic = new_topic(1)
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    for key, value in [("scenes", b"v1"), ("animals", b"a1"), ("scenes", b"v2"), ("animals", None)]:
        producer.send(topic, key=key.encode(), value=value).get(timeout=30)
    reloader = RecordingReloader()
    feed = TaxonomyFeed(build_feed_consumer(KafkaSettings(bootstrap_servers=broker.bootstrap)), topic, reloader)  # type: ignore[arg-type]
    feed.start(catch_up_timeout_s=10)
    try:
        # Only the last document per name, before start() returns: older versions are never applied.
        assert sorted(reloader.calls, key=str) == sorted([("scenes", "v2"), ("animals", None)], key=str)
        producer.send(topic, key=b"scenes", value=b"v3").get(timeout=30)
        for _ in range(100):
            if ("scenes", "v3") in reloader.calls:
                break
            threading.Event().wait(0.1)
        assert reloader.calls[-1] == ("scenes", "v3") and len(reloader.calls) == 3
    finally:
        producer.close()
        feed.stop()


def test_the_feed_waits_for_a_topic_that_does_not_exist_yet(broker: Any, unique_id: str) -> None:
    topic = f"ls-test-late-{unique_id}"
    reloader = RecordingReloader()
    feed = TaxonomyFeed(build_feed_consumer(KafkaSettings(bootstrap_servers=broker.bootstrap)), topic, reloader, retry_s=0.2)  # type: ignore[arg-type]
    feed.start(catch_up_timeout_s=5)
    try:
        assert reloader.calls == []
        create_topic(broker.bootstrap, topic, 1)
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
        producer.send(topic, key=b"scenes", value=b"late").get(timeout=30)
        producer.close()
        for _ in range(100):
            if reloader.calls:
                break
            threading.Event().wait(0.1)
        assert reloader.calls == [("scenes", "late")]
    finally:
        feed.stop()
