"""`labelstream eval` end to end on the conformal-clip-data textile images, with the tiny model.

The local run evaluates the whole dataset folder as the wheel ships it (all
2,000 images: 1,000 nominal, 500 local, 500 global) and checks that every image
is counted in its class; the S3 run uses 100 per class, uploaded to the real
test S3 server. Later runs reuse the first run's cached embeddings. Runs are
in-process through the CLI entry point.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog
from prometheus_client import REGISTRY

from labelstream.cli import main as cli_main
from pipeline.config import Settings, TaxonomySettings
from pipeline.labeler import build_labeler
from pipeline.taxonomy_store import load_configured

CLASSES = ("nominal", "local", "global")
LOCAL_SUPPORT = {"nominal": 1000, "local": 500, "global": 500}
LOCAL_TOTAL = sum(LOCAL_SUPPORT.values())
S3_PER_CLASS = 100
TARGET_PRECISION = 0.6

SINGLE_LABEL = (Path(__file__).resolve().parent.parent / "examples" / "textile.yaml").read_text()
REWORDED = SINGLE_LABEL.replace("flawless woven textile", "perfect plain textile").replace("all over", "everywhere")
MULTI_LABEL = SINGLE_LABEL.replace("name: textile\n", "name: textile-ml\nmode: multi_label\n")


def textile_root() -> Path:
    import conformal_clip_data

    return Path(conformal_clip_data.__file__).parent / "data" / "textile_images" / "simulated"


def model_env(monkeypatch: pytest.MonkeyPatch, tiny_model: Any) -> None:
    monkeypatch.setenv("LABELSTREAM_MODEL__NAME", str(tiny_model.config_path))
    monkeypatch.setenv("LABELSTREAM_MODEL__PRETRAINED", str(tiny_model.checkpoint_path))
    monkeypatch.setenv("LABELSTREAM_MODEL__DEVICE", "cpu")
    monkeypatch.setenv("LABELSTREAM_LOG__FORMAT", "json")


def encoded_count() -> float:
    return REGISTRY.get_sample_value("labelstream_eval_images_encoded_total") or 0.0


@dataclass(frozen=True)
class FirstRun:
    folder: Path
    work: Path
    cache: Path
    output: dict[str, Any]
    report: Path
    wall_s: float


@pytest.fixture(scope="module")
def first_run(tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FirstRun]:
    work = tmp_path_factory.mktemp("eval")
    folder = textile_root()  # read in place: eval never writes into the dataset
    (work / "textile.yaml").write_text(SINGLE_LABEL)
    with pytest.MonkeyPatch.context() as monkeypatch:
        model_env(monkeypatch, tiny_model)
        started = time.perf_counter()
        code = cli_main(["eval", str(folder), "--taxonomy", str(work / "textile.yaml"), "--json", str(work / "first.json"),
                         "--report", str(work / "first.html"), "--cache-dir", str(work / "cache")])
        wall_s = time.perf_counter() - started
        assert code == 0
        yield FirstRun(folder, work, work / "cache", json.loads((work / "first.json").read_text()), work / "first.html", wall_s)
    # configure_logging cached structlog loggers for this process; later tests start clean.
    structlog.reset_defaults()


def run_eval(monkeypatch: pytest.MonkeyPatch, tiny_model: Any, args: list[str]) -> int:
    model_env(monkeypatch, tiny_model)
    return cli_main(["eval", *args])


def test_local_imagefolder_counts_every_image_in_its_class(first_run: FirstRun) -> None:
    output = first_run.output
    assert output["n_images"] == LOCAL_TOTAL and output["n_failed"] == 0
    assert {name: c["support"] for name, c in output["per_class"].items()} == LOCAL_SUPPORT
    confusion = output["confusion"]
    assert confusion["labels"] == list(CLASSES)
    assert [sum(row) for row in confusion["matrix"]] == [LOCAL_SUPPORT[c] for c in CLASSES]
    correct = sum(confusion["matrix"][i][i] for i in range(3))
    assert output["top1_accuracy"] == pytest.approx(correct / LOCAL_TOTAL)
    assert output["top1_ci"][0] <= output["top1_accuracy"] <= output["top1_ci"][1]
    assert output["top5_accuracy"] == 1.0  # three classes: the top 5 holds all of them
    for key in ("macro", "micro", "most_confused", "average_precision", "embedding_cache", "taxonomy", "model"):
        assert key in output
    assert output["embedding_cache"] == {**output["embedding_cache"], "hit": False, "images_encoded": LOCAL_TOTAL}
    html = first_run.report.read_text()
    assert "<h2>Confusion matrix</h2>" in html and html.count('src="data:image/') >= 4


def test_second_run_with_changed_prompts_reuses_the_image_embeddings(
    first_run: FirstRun, monkeypatch: pytest.MonkeyPatch, tiny_model: Any
) -> None:
    work = first_run.work
    (work / "reworded.yaml").write_text(REWORDED)
    before = encoded_count()
    started = time.perf_counter()
    code = run_eval(monkeypatch, tiny_model, [
        str(first_run.folder), "--taxonomy", str(work / "reworded.yaml"), "--compare", str(work / "textile.yaml"),
        "--json", str(work / "second.json"), "--cache-dir", str(first_run.cache),
    ])
    wall_s = time.perf_counter() - started
    assert code == 0
    output = json.loads((work / "second.json").read_text())
    assert output["embedding_cache"]["hit"] is True and output["embedding_cache"]["images_encoded"] == 0
    assert encoded_count() == before, "images went through the encoder again"
    assert output["taxonomy"]["version"] != first_run.output["taxonomy"]["version"]
    assert output["n_images"] == first_run.output["n_images"]
    compare = output["compare"]
    assert compare["test"].startswith("mcnemar") and 0.0 <= compare["p_value"] <= 1.0
    assert compare["baseline_accuracy"] == pytest.approx(first_run.output["top1_accuracy"])
    assert compare["candidate_accuracy"] == pytest.approx(output["top1_accuracy"])
    assert compare["accuracy_difference"] == pytest.approx(compare["candidate_accuracy"] - compare["baseline_accuracy"])
    # The image side, the part prompt changes never need, is at least an order of magnitude faster.
    assert output["embedding_cache"]["seconds"] * 10 < first_run.output["embedding_cache"]["seconds"]
    assert wall_s < first_run.wall_s, (wall_s, first_run.wall_s)


def test_written_thresholds_load_in_the_worker_and_keep_their_precision(
    first_run: FirstRun, monkeypatch: pytest.MonkeyPatch, tiny_model: Any
) -> None:
    work = first_run.work
    (work / "multi.yaml").write_text(MULTI_LABEL)
    code = run_eval(monkeypatch, tiny_model, [
        str(first_run.folder), "--taxonomy", str(work / "multi.yaml"), "--target-precision", str(TARGET_PRECISION),
        "--write-thresholds", str(work / "calibrated.yaml"), "--json", str(work / "calibrate.json"),
        "--cache-dir", str(first_run.cache),
    ])
    assert code == 0
    chosen = json.loads((work / "calibrate.json").read_text())["thresholds"]
    reachable = [name for name, t in chosen.items() if t["reachable"]]
    assert reachable, chosen
    for name in reachable:
        assert chosen[name]["precision"] >= TARGET_PRECISION
        assert chosen[name]["auto_share"] + chosen[name]["review_share"] <= 1.0

    # The worker's own loader accepts the file, and its classifier carries the thresholds.
    settings = Settings(taxonomy=TaxonomySettings(path=work / "calibrated.yaml"))
    (taxonomy,) = load_configured(settings.taxonomy)
    for item in taxonomy.classes:
        expected = chosen[item.name]["threshold"] if chosen[item.name]["reachable"] else 0.5
        assert taxonomy.threshold_of(item) == pytest.approx(expected)
    model_env(monkeypatch, tiny_model)
    labeler = build_labeler(Settings(taxonomy=TaxonomySettings(path=work / "calibrated.yaml")))
    assert labeler.classifier_for(None).taxonomy == taxonomy

    # Evaluated again as written, each calibrated class gives the promised precision.
    code = run_eval(monkeypatch, tiny_model, [
        str(first_run.folder), "--taxonomy", str(work / "calibrated.yaml"), "--json", str(work / "recheck.json"),
        "--cache-dir", str(first_run.cache),
    ])
    assert code == 0
    recheck = json.loads((work / "recheck.json").read_text())
    assert recheck["embedding_cache"]["hit"] is True
    for name in reachable:
        assert recheck["thresholds"][name]["precision"] >= TARGET_PRECISION
        assert recheck["thresholds"][name]["precision"] == pytest.approx(chosen[name]["precision"])


def test_s3_prefix_dataset(
    s3_server: Any, s3_client: Any, new_bucket: Callable[[], str], tiny_model: Any,
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    bucket = new_bucket()
    for label in CLASSES:
        for source in sorted((textile_root() / label).glob("*.jpg"))[:S3_PER_CLASS]:
            s3_client.upload_file(str(source), bucket, f"audit/{label}/{source.name}")
    s3_client.put_object(Bucket=bucket, Key="audit/README.txt", Body=b"not an image, not in a class folder")
    (tmp_path / "textile.yaml").write_text(SINGLE_LABEL)
    monkeypatch.setenv("LABELSTREAM_S3__ENDPOINT_URL", s3_server.endpoint_url)
    code = run_eval(monkeypatch, tiny_model, [
        f"s3://{bucket}/audit/", "--taxonomy", str(tmp_path / "textile.yaml"), "--json", str(tmp_path / "s3.json"),
        "--report", str(tmp_path / "s3.html"), "--cache-dir", str(tmp_path / "cache"),
    ])
    assert code == 0
    output = json.loads((tmp_path / "s3.json").read_text())
    assert output["n_images"] == 3 * S3_PER_CLASS and output["n_failed"] == 0
    assert {name: c["support"] for name, c in output["per_class"].items()} == dict.fromkeys(CLASSES, S3_PER_CLASS)
    assert [sum(row) for row in output["confusion"]["matrix"]] == [S3_PER_CLASS] * 3
    html = (tmp_path / "s3.html").read_text()
    assert html.count('src="data:image/jpeg') >= 3  # gallery thumbnails fetched back from S3


def test_dataset_class_missing_from_the_taxonomy_is_an_error_naming_it(
    first_run: FirstRun, monkeypatch: pytest.MonkeyPatch, tiny_model: Any, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "two.yaml").write_text("name: two\ntemplates: ['{}']\nclasses: [nominal, local]\n")
    code = run_eval(monkeypatch, tiny_model, [str(first_run.folder), "--taxonomy", str(tmp_path / "two.yaml")])
    assert code == 2
    assert "'global'" in capsys.readouterr().err
    (tmp_path / "map.yaml").write_text("global: local\n")
    (tmp_path / "four.yaml").write_text("name: four\ntemplates: ['{}']\nclasses: [nominal, local, stain]\n")
    code = run_eval(monkeypatch, tiny_model, [
        str(first_run.folder), "--taxonomy", str(tmp_path / "four.yaml"), "--map", str(tmp_path / "map.yaml"),
        "--json", str(tmp_path / "mapped.json"), "--cache-dir", str(first_run.cache),
    ])
    assert code == 0
    output = json.loads((tmp_path / "mapped.json").read_text())
    assert output["per_class"]["local"]["support"] == LOCAL_SUPPORT["local"] + LOCAL_SUPPORT["global"]
    assert any("stain" in warning for warning in output["warnings"])
