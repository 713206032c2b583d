"""`labelstream classify`: offline labelling with the worker's own engine, run as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import BatchSettings, ModelSettings, Settings, TaxonomySettings
from pipeline.labeler import build_labeler

TAXONOMY_YAML = """\
name: cli-test
top_k: 3
templates: ["a photo of a {}.", "a close-up photo of the {}."]
classes:
  - name: pet
    prompts: [dog, cat]
  - flower
  - temple
  - fabric
"""
CLASS_NAMES = {"pet", "flower", "temple", "fabric"}


@dataclass(frozen=True)
class CliRun:
    returncode: int
    stdout: str
    stderr: str

    def json_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]


@pytest.fixture
def taxonomy_file(tmp_path: Path) -> Path:
    path = tmp_path / "cli-test.yaml"
    path.write_text(TAXONOMY_YAML)
    return path


@pytest.fixture
def classify_env(tiny_model: Any, s3_server: Any) -> dict[str, str]:
    return {
        **_environment_without_labelstream(),
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "LABELSTREAM_S3__ENDPOINT_URL": s3_server.endpoint_url,
        "LABELSTREAM_MODEL__NAME": str(tiny_model.config_path),
        "LABELSTREAM_MODEL__PRETRAINED": str(tiny_model.checkpoint_path),
        "LABELSTREAM_MODEL__DEVICE": "cpu",
        "LABELSTREAM_LOG__FORMAT": "json",
    }


def run_classify(args: list[str], env: dict[str, str]) -> CliRun:
    script = Path(sys.executable).with_name("labelstream")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "labelstream.cli"]
    done = subprocess.run([*command, "classify", *args], env=env, capture_output=True, text=True, timeout=300)
    return CliRun(done.returncode, done.stdout, done.stderr)


@pytest.fixture
def broken_image(tmp_path: Path) -> Path:
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"this is not a JPEG at all, just text with a .jpg name")
    return path


def test_json_output_labels_local_and_s3_images_and_reports_broken_ones(
    classify_env: dict[str, str],
    taxonomy_file: Path,
    sample_photos: list[Path],
    broken_image: Path,
    s3_client: Any,
    new_bucket: Any,
    tmp_path: Path,
) -> None:
    bucket = new_bucket()
    s3_client.put_object(Bucket=bucket, Key="photos/china.jpg", Body=sample_photos[0].read_bytes())
    missing = tmp_path / "missing.jpg"
    images = [str(sample_photos[1]), str(broken_image), f"s3://{bucket}/photos/china.jpg",
              str(missing), str(sample_photos[2]), f"s3://{bucket}/photos/absent.jpg"]  # fmt: skip

    run = run_classify(["--json", "--taxonomy", str(taxonomy_file), *images], classify_env)

    assert run.returncode == 1, run.stderr[-3000:]
    lines = run.json_lines()
    assert [line["image"] for line in lines] == images
    good = [lines[0], lines[2], lines[4]]
    for line in good:
        assert "error" not in line
        assert line["taxonomy"]["name"] == "cli-test"
        assert len(line["labels"]) == 3
        assert {label["label"] for label in line["labels"]} <= CLASS_NAMES
        scores = [label["score"] for label in line["labels"]]
        assert scores == sorted(scores, reverse=True)
    assert lines[1]["error"]["code"] == "image.unsupported_format"
    assert lines[1]["error"]["stage"] == "decode"
    assert lines[3]["error"]["code"] == "file.not_found"
    assert lines[5]["error"]["code"] == "s3.not_found"
    assert "labels" not in lines[1]


def test_s3_image_gets_the_same_labels_as_the_local_copy(
    classify_env: dict[str, str], taxonomy_file: Path, sample_photos: list[Path], s3_client: Any, new_bucket: Any
) -> None:
    bucket = new_bucket()
    s3_client.put_object(Bucket=bucket, Key="a.jpg", Body=sample_photos[0].read_bytes())

    run = run_classify(["--json", "--taxonomy", str(taxonomy_file), str(sample_photos[0]), f"s3://{bucket}/a.jpg"], classify_env)

    assert run.returncode == 0, run.stderr[-3000:]
    local, remote = run.json_lines()
    assert local["labels"] == remote["labels"]
    assert local["taxonomy"] == remote["taxonomy"]


def test_table_output(classify_env: dict[str, str], taxonomy_file: Path, sample_photos: list[Path], broken_image: Path) -> None:
    images = [str(sample_photos[0]), str(broken_image), str(sample_photos[1])]

    run = run_classify(["--taxonomy", str(taxonomy_file), *images], classify_env)

    assert run.returncode == 1, run.stderr[-3000:]
    rows = run.stdout.splitlines()
    assert len(rows) == 3
    for row, image in zip(rows, images, strict=True):
        assert row.startswith(f"{image}\t")
    assert "ERROR [image.unsupported_format]" in rows[1]
    for row in (rows[0], rows[2]):
        shown = row.split("\t", 1)[1].split(", ")
        assert len(shown) == 3
        for entry in shown:
            label, score = entry.rsplit(" ", 1)
            assert label in CLASS_NAMES
            assert 0.0 <= float(score) <= 1.0 and len(score.split(".")[1]) == 3


def test_results_equal_the_labeler_called_directly(
    classify_env: dict[str, str], taxonomy_file: Path, sample_photos: list[Path], tiny_model: Any
) -> None:
    images = sample_photos[:5]
    # A batch size of 2 makes the CLI run three model calls, not one.
    env = {**classify_env, "LABELSTREAM_BATCH__MAX_SIZE": "2"}

    run = run_classify(["--json", "--taxonomy", str(taxonomy_file), *map(str, images)], env)

    assert run.returncode == 0, run.stderr[-3000:]
    settings = Settings(
        model=ModelSettings(name=str(tiny_model.config_path), pretrained=str(tiny_model.checkpoint_path), device="cpu"),
        taxonomy=TaxonomySettings(path=taxonomy_file),
        batch=BatchSettings(max_size=2),
    )
    labeler = build_labeler(settings)
    classifier = labeler.classifier_for(None)
    for line, path in zip(run.json_lines(), images, strict=True):
        [direct] = labeler.label([labeler.prepare_bytes(path.read_bytes()).pixels], [classifier])
        assert line["taxonomy"] == direct.taxonomy.model_dump()
        assert [entry["label"] for entry in line["labels"]] == [label for label, _ in direct.labels]
        for entry, (_, score) in zip(line["labels"], direct.labels, strict=True):
            assert entry["score"] == pytest.approx(score, abs=1e-5)


def test_bad_taxonomy_file_exits_2_with_a_message(classify_env: dict[str, str], tmp_path: Path, sample_photos: list[Path]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ntemplates: ['no placeholder']\nclasses: [a, b]\n")

    run = run_classify(["--taxonomy", str(bad), str(sample_photos[0])], classify_env)

    assert run.returncode == 2
    assert run.stdout == ""
    assert str(bad) in run.stderr and "templates" in run.stderr


def _environment_without_labelstream() -> dict[str, str]:
    """The caller's environment minus any LABELSTREAM_ settings, so the test sees only its own."""
    return {k: v for k, v in os.environ.items() if not k.startswith("LABELSTREAM_")}
