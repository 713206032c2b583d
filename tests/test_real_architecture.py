"""The model card's real architecture, convnext_large_d_320, end to end through the CLI.

Its weights live on the Hugging Face hub, which CI cannot reach, so the
architecture is built with random weights (model.pretrained set to ""). The
numbers mean nothing; what is checked is that the 352 M-parameter model, its
320 px preprocessing and its tokenizer run through `labelstream classify`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_settings
from pipeline.model import resolve_source

REAL_MODEL = "convnext_large_d_320"
CLASSES = ("dog", "cat", "flower")


def _labelstream_command() -> list[str]:
    script = Path(sys.executable).with_name("labelstream")
    return [str(script)] if script.exists() else [sys.executable, "-m", "labelstream.cli"]


def _random_weights_env() -> dict[str, str]:
    return {
        **_environment_without_labelstream(),
        "LABELSTREAM_MODEL__NAME": REAL_MODEL,
        "LABELSTREAM_MODEL__PRETRAINED": "",
        "LABELSTREAM_MODEL__DEVICE": "cpu",
        "LABELSTREAM_LOG__FORMAT": "json",
        # Belt and braces: nothing here may try the network.
        "HF_HUB_OFFLINE": "1",
    }


def test_empty_pretrained_from_the_environment_means_random_init(monkeypatch: pytest.MonkeyPatch) -> None:
    # pydantic-settings keeps "" as "" (it does not become None); load_model
    # treats any empty value as "no weights", which is what this relies on.
    monkeypatch.setenv("LABELSTREAM_MODEL__NAME", REAL_MODEL)
    monkeypatch.setenv("LABELSTREAM_MODEL__PRETRAINED", "")
    settings = load_settings()
    assert settings.model.pretrained in ("", None)
    source = resolve_source(settings.model)
    assert source.pretrained is None
    assert source.identity.endswith("random-init")


def test_classify_json_with_the_real_architecture(tmp_path: Path, sample_photos: list[Path]) -> None:
    taxonomy = tmp_path / "three.yaml"
    taxonomy.write_text('name: three\ntemplates: ["a photo of a {}."]\nclasses: [dog, cat, flower]\n')
    images = [str(p) for p in sample_photos[:2]]

    done = subprocess.run(
        [*_labelstream_command(), "classify", "--json", "--taxonomy", str(taxonomy), *images],
        env=_random_weights_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert done.returncode == 0, done.stderr[-4000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert [line["image"] for line in lines] == images
    for line in lines:
        assert line["taxonomy"]["name"] == "three"
        assert sorted(label["label"] for label in line["labels"]) == sorted(CLASSES)
        scores = [label["score"] for label in line["labels"]]
        assert scores == sorted(scores, reverse=True)
        assert sum(scores) == pytest.approx(1.0, abs=1e-4)


def _environment_without_labelstream() -> dict[str, str]:
    """The caller's environment minus any LABELSTREAM_ settings, so the test sees only its own."""
    return {k: v for k, v in os.environ.items() if not k.startswith("LABELSTREAM_")}
