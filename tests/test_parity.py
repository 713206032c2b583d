"""Our engine gives open_clip's own numbers: same preprocessing, embeddings, classifier and scores.

The reference side calls open_clip's public API exactly as its README does
(create_model_and_transforms, encode_image, build_zero_shot_classifier); our
side goes through load_model, build_classifier and the Labeler, on bytes.
Both load the same tiny checkpoint, in fp32 on the CPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.classifier import ZeroShotClassifier, build_classifier
from pipeline.config import ImageSettings, ModelSettings
from pipeline.labeler import Labeler
from pipeline.model import LoadedModel, load_model
from pipeline.registry import ClassifierRegistry
from pipeline.taxonomy import Taxonomy, TaxonomyClass

TEMPLATES = ("a photo of a {}.", "a blurry photo of the {}.", "itap of a {}.")
CLASSNAMES = ("dog", "cat", "tabby cat", "flower", "temple", "fabric", "car")
PROB_TOLERANCE = 1e-4
WEIGHT_TOLERANCE = 1e-5
MIN_COSINE = 0.99999


@dataclass(frozen=True)
class Reference:
    """open_clip's own model, eval transform and tokenizer for the tiny checkpoint."""

    model: Any
    preprocess: Any
    tokenizer: Any


@pytest.fixture(scope="module")
def reference(tiny_model: Any) -> Reference:
    import open_clip

    open_clip.add_model_config(tiny_model.config_path)
    stem = tiny_model.config_path.stem
    model, _, preprocess_val = open_clip.create_model_and_transforms(stem, pretrained=str(tiny_model.checkpoint_path))
    model.eval()
    return Reference(model, preprocess_val, open_clip.get_tokenizer(stem))


@pytest.fixture(scope="module")
def ours(tiny_model: Any) -> LoadedModel:
    settings = ModelSettings(name=str(tiny_model.config_path), pretrained=str(tiny_model.checkpoint_path), device="cpu")
    return load_model(settings)


@pytest.fixture(scope="module")
def taxonomy() -> Taxonomy:
    return Taxonomy(
        name="parity",
        templates=TEMPLATES,
        classes=tuple(TaxonomyClass(name=n) for n in CLASSNAMES),
        top_k=len(CLASSNAMES),
    )


@pytest.fixture(scope="module")
def classifier(ours: LoadedModel, taxonomy: Taxonomy) -> ZeroShotClassifier:
    return build_classifier(ours, taxonomy)


@pytest.fixture(scope="module")
def labeler(ours: LoadedModel, classifier: ZeroShotClassifier) -> Labeler:
    return Labeler(ours, ClassifierRegistry([classifier]), ImageSettings())


@pytest.fixture(scope="module")
def reference_weights(reference: Reference) -> torch.Tensor:
    import open_clip

    with torch.no_grad():
        return open_clip.build_zero_shot_classifier(reference.model, reference.tokenizer, list(CLASSNAMES), list(TEMPLATES))


@pytest.fixture(scope="module")
def generated_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Sizes and aspect ratios real uploads have, plus one smaller than the model input."""
    target = tmp_path_factory.mktemp("parity-images")
    rng = np.random.default_rng(7)
    specs = [("landscape-640x480.jpg", 640, 480, "RGB"), ("tall-300x900.png", 300, 900, "RGB"),
             ("wide-1000x250.jpg", 1000, 250, "RGB"), ("tiny-40x30.png", 40, 30, "RGB"),
             ("alpha-320x200.png", 320, 200, "RGBA")]  # fmt: skip
    paths = []
    for name, width, height, mode in specs:
        path = target / name
        _textured_image(rng, width, height, mode).save(path)
        paths.append(path)
    return paths


def _textured_image(rng: np.random.Generator, width: int, height: int, mode: str) -> Image.Image:
    """Gradients plus noise: enough structure that resizing filters matter."""
    ys, xs = np.mgrid[0:height, 0:width]
    channels = [(xs * 255 / width), (ys * 255 / height), ((xs + ys) % 64) * 4]
    if mode == "RGBA":
        channels.append(np.where((xs // 40 + ys // 40) % 2 == 0, 255, 60))
    stacked = np.stack(channels, axis=-1) + rng.normal(0, 20, (height, width, len(channels)))
    return Image.fromarray(np.clip(stacked, 0, 255).astype(np.uint8), mode)


def _reference_pixels(reference: Reference, path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        if im.mode == "RGBA":
            # Our decoder composites transparency onto white; open_clip's
            # convert('RGB') would keep the hidden colour. Compare like with like.
            white = Image.new("RGBA", im.size, (255, 255, 255, 255))
            return reference.preprocess(Image.alpha_composite(white, im).convert("RGB"))
        return reference.preprocess(im)


def _reference_features(reference: Reference, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.nn.functional.normalize(reference.model.encode_image(pixels), dim=-1)


def _reference_probabilities(reference: Reference, features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return (reference.model.logit_scale.exp() * features @ weights).softmax(dim=-1)


def _all_images(sample_photos: list[Path], generated_images: list[Path]) -> list[Path]:
    return list(sample_photos) + list(generated_images)


def test_classifier_weights_match_build_zero_shot_classifier(
    classifier: ZeroShotClassifier, reference_weights: torch.Tensor
) -> None:
    assert classifier.weights.shape == reference_weights.shape
    assert torch.allclose(classifier.weights, reference_weights, atol=WEIGHT_TOLERANCE, rtol=0)


def test_logit_scale_is_the_models(ours: LoadedModel, reference: Reference) -> None:
    assert ours.logit_scale == pytest.approx(reference.model.logit_scale.exp().item(), rel=1e-6)


def test_labels_embeddings_and_probabilities_match_open_clip(
    reference: Reference,
    reference_weights: torch.Tensor,
    labeler: Labeler,
    classifier: ZeroShotClassifier,
    sample_photos: list[Path],
    generated_images: list[Path],
) -> None:
    paths = _all_images(sample_photos, generated_images)
    ref_features = _reference_features(reference, torch.stack([_reference_pixels(reference, p) for p in paths]))
    ref_probs = _reference_probabilities(reference, ref_features, reference_weights)

    prepared = [labeler.prepare_bytes(p.read_bytes()).pixels for p in paths]
    results = labeler.label(prepared, [classifier] * len(paths))
    our_features = torch.from_numpy(np.stack([r.embedding for r in results]))
    our_probs = classifier.probabilities(our_features)

    cosines = (our_features * ref_features).sum(dim=-1)
    assert cosines.min().item() >= MIN_COSINE, dict(zip([p.name for p in paths], cosines.tolist(), strict=True))
    assert (our_probs - ref_probs).abs().max().item() <= PROB_TOLERANCE
    for path, result, row in zip(paths, results, ref_probs, strict=True):
        assert result.labels[0][0] == CLASSNAMES[int(row.argmax())], path.name
        assert result.labels[0][1] == pytest.approx(float(row.max()), abs=PROB_TOLERANCE), path.name


def test_our_preprocessing_matches_open_clips_pixels(
    reference: Reference, labeler: Labeler, sample_photos: list[Path], generated_images: list[Path]
) -> None:
    for path in _all_images(sample_photos[:3], generated_images):
        ours = labeler.prepare_bytes(path.read_bytes()).pixels
        expected = _reference_pixels(reference, path)
        assert ours.shape == expected.shape == (3, 64, 64)
        # alpha_composite and paste-with-mask may round one 8-bit level apart
        # (1/255/std, about 0.015); everything else must be bit-identical.
        tolerance = 0.02 if path.suffix == ".png" and "alpha" in path.name else 0.0
        assert (ours - expected).abs().max().item() <= tolerance, path.name


def test_top_labels_are_sorted_and_cover_the_taxonomy(labeler: Labeler, classifier: ZeroShotClassifier, sample_photos: list[Path]) -> None:
    [result] = labeler.label([labeler.prepare_bytes(sample_photos[0].read_bytes()).pixels], [classifier])
    scores = [score for _, score in result.labels]
    assert sorted(scores, reverse=True) == scores
    assert sorted(label for label, _ in result.labels) == sorted(CLASSNAMES)
    assert sum(scores) == pytest.approx(1.0, abs=1e-5)
    assert result.taxonomy.version == classifier.version


def test_multi_prompt_class_is_the_renormalised_mean_of_its_prompts(ours: LoadedModel, reference: Reference) -> None:
    taxonomy = Taxonomy(
        name="multi",
        templates=TEMPLATES,
        classes=(TaxonomyClass(name="pet", prompts=("dog", "kitten")), TaxonomyClass(name="car")),
    )
    weights = build_classifier(ours, taxonomy).weights

    texts = [t.format(p) for p in ("dog", "kitten") for t in TEMPLATES]
    with torch.no_grad():
        embedded = reference.model.encode_text(reference.tokenizer(texts), normalize=True)
    mean = embedded.mean(dim=0)
    expected = mean / mean.norm()
    assert torch.allclose(weights[:, 0], expected, atol=WEIGHT_TOLERANCE, rtol=0)
    assert weights[:, 0].norm().item() == pytest.approx(1.0, abs=1e-6)


def test_preprocess_config_is_the_models(ours: LoadedModel, reference: Reference) -> None:
    import open_clip

    expected = open_clip.get_model_preprocess_cfg(reference.model)
    for key in ("size", "mean", "std", "interpolation", "resize_mode"):
        assert tuple(np.atleast_1d(ours.preprocess_cfg[key])) == tuple(np.atleast_1d(expected[key])), key


def test_image_size_follows_a_second_model_config(tmp_path: Path, tiny_model: Any, sample_photos: list[Path]) -> None:
    config = json.loads(tiny_model.config_path.read_text())
    config["vision_cfg"]["image_size"] = 80
    path = tmp_path / "tiny-convnext-clip-80.json"
    path.write_text(json.dumps(config))

    model = load_model(ModelSettings(name=str(path), pretrained=None, device="cpu"))
    labeler = Labeler(model, ClassifierRegistry([build_classifier(model, _two_classes())]), ImageSettings())
    pixels = labeler.prepare_bytes(sample_photos[0].read_bytes()).pixels
    assert pixels.shape == (3, 80, 80)
    assert tuple(model.preprocess_cfg["size"]) == (80, 80)
    [result] = labeler.label([pixels], [labeler.classifier_for(None)])
    assert result.embedding.shape == (config["embed_dim"],)


def test_local_dir_preprocess_cfg_is_picked_up(tmp_path: Path, tiny_model: Any, sample_photos: list[Path]) -> None:
    """A local-dir model's open_clip_config.json carries its own preprocess_cfg; we must honour it."""
    import open_clip

    model_cfg = json.loads(tiny_model.config_path.read_text())
    model_cfg["vision_cfg"]["image_size"] = 96
    preprocess_cfg = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear", "resize_mode": "squash"}
    folder = tmp_path / "local-model"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}))
    torch.manual_seed(3)
    built = open_clip.create_model(tiny_model.config_path.stem, pretrained=None, force_image_size=96)
    torch.save(built.state_dict(), folder / "open_clip_pytorch_model.bin")

    model = load_model(ModelSettings(name=f"local-dir:{folder}", pretrained=None, device="cpu"))
    assert tuple(model.preprocess_cfg["size"]) == (96, 96)
    for key, value in preprocess_cfg.items():
        assert tuple(np.atleast_1d(model.preprocess_cfg[key])) == tuple(np.atleast_1d(value)), key

    _, _, reference_preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    labeler = Labeler(model, ClassifierRegistry([build_classifier(model, _two_classes())]), ImageSettings())
    ours = labeler.prepare_bytes(sample_photos[0].read_bytes()).pixels
    with Image.open(sample_photos[0]) as im:
        expected = reference_preprocess(im)
    assert ours.shape == (3, 96, 96)
    assert torch.allclose(ours, expected, atol=1e-6)


def _two_classes() -> Taxonomy:
    return Taxonomy(name="two", templates=("a photo of a {}.",), classes=(TaxonomyClass(name="a"), TaxonomyClass(name="b")))
