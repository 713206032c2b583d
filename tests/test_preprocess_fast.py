"""preprocess.mode: fast (JPEG draft, Image.reduce) against exact (open_clip's own transform)."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import open_clip
import pytest
import torch
from PIL import Image

from pipeline.config import ImageSettings, ModelSettings, PreprocessSettings, Settings
from pipeline.decode import decode_image
from pipeline.errors import ImageError
from pipeline.gpu_decode import preprocess_jpegs
from pipeline.model import LoadedModel, load_model
from pipeline.preprocess import FusedCropResize, Preprocessor, reduce_to_side

# The real model's input: 320 px, open_clip's OpenAI mean/std, bicubic, shortest-side resize.
REAL_CFG: dict[str, Any] = {
    "size": (320, 320),
    "mean": open_clip.OPENAI_DATASET_MEAN,
    "std": open_clip.OPENAI_DATASET_STD,
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}
IMAGE_SETTINGS = ImageSettings()


def test_the_real_models_preprocess_config_is_what_the_bench_assumes() -> None:
    from bench.preprocess_bench import REAL_CFG as BENCH_CFG

    config = open_clip.get_model_config("convnext_large_d_320")
    assert config is not None and config["vision_cfg"]["image_size"] == 320
    assert open_clip.get_pretrained_cfg("convnext_large_d_320", "laion2b_s29b_b131k_ft_soup").get("mean") in (
        None, REAL_CFG["mean"])
    assert BENCH_CFG == REAL_CFG


def test_fused_crop_resize_matches_resize_then_centre_crop() -> None:
    transform = real_transform()
    fused = FusedCropResize.from_cfg(REAL_CFG)
    assert fused is not None
    for size in [(1920, 1080), (1080, 1920), (641, 480), (333, 1000), (320, 320)]:
        image = photo(size)
        difference = (fused(image) - transform(image)).abs()
        # One 8-bit level is 1/255/std ~ 0.015 in normalised units. Landscape matches
        # to one level; portrait to three (Pillow's fixed-point vertical pass), 0.0015 mean.
        assert difference.max().item() <= 0.05 and difference.mean().item() < 0.003, size
    assert FusedCropResize.from_cfg({**REAL_CFG, "resize_mode": "squash"}) is None


def real_transform() -> Callable[[Image.Image], torch.Tensor]:
    return open_clip.image_transform(320, is_train=False, mean=REAL_CFG["mean"], std=REAL_CFG["std"])


def photo(size: tuple[int, int], source_index: int = 0) -> Image.Image:
    """A real photograph (scikit-learn's china.jpg or flower.jpg) resized to `size`."""
    from sklearn.datasets import load_sample_images

    return Image.fromarray(load_sample_images().images[source_index]).resize(size, Image.Resampling.BICUBIC)


def encoded(image: Image.Image, fmt: str = "JPEG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tiny_loaded(tiny_model: Any) -> LoadedModel:
    settings = ModelSettings(name=str(tiny_model.config_path), pretrained=str(tiny_model.checkpoint_path), device="cpu")
    return load_model(settings)


@pytest.fixture(scope="module")
def jpeg_1080p() -> bytes:
    return encoded(photo((1920, 1080)), quality=90)


@pytest.fixture(scope="module")
def jpeg_12mp() -> bytes:
    return encoded(photo((4000, 3000), source_index=1), quality=90)


def test_mode_is_a_setting_defaulting_to_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().preprocess.mode == "exact"
    monkeypatch.setenv("LABELSTREAM_PREPROCESS__MODE", "fast")
    assert Settings().preprocess.mode == "fast"
    with pytest.raises(ValueError):
        Preprocessor(real_transform(), REAL_CFG, mode="quick")


def test_exact_mode_is_byte_identical_to_decode_then_open_clip_transform(
    tiny_loaded: LoadedModel, jpeg_1080p: bytes
) -> None:
    exact = Preprocessor.for_model(tiny_loaded, PreprocessSettings(mode="exact"))
    today = tiny_loaded.preprocess(decode_image(jpeg_1080p, IMAGE_SETTINGS))
    assert torch.equal(exact(jpeg_1080p, IMAGE_SETTINGS), today)


@pytest.mark.parametrize("use_real_size", [True, False], ids=["320px", "tiny-64px"])
def test_fast_output_has_the_exact_shape_and_drifts_little_on_a_1080p_photo(
    use_real_size: bool, tiny_loaded: LoadedModel, jpeg_1080p: bytes
) -> None:
    if use_real_size:
        transform, cfg = real_transform(), REAL_CFG
    else:
        transform, cfg = tiny_loaded.preprocess, tiny_loaded.preprocess_cfg
    exact = Preprocessor(transform, cfg, "exact")(jpeg_1080p, IMAGE_SETTINGS)
    fast = Preprocessor(transform, cfg, "fast")(jpeg_1080p, IMAGE_SETTINGS)
    assert fast.shape == exact.shape
    # Measured: 0.009 (320 px) and 0.011 (64 px) mean, in normalised units.
    assert (fast - exact).abs().mean().item() < 0.05


def test_draft_decodes_a_12_megapixel_jpeg_at_one_eighth_scale(jpeg_12mp: bytes) -> None:
    decoded = Preprocessor(real_transform(), REAL_CFG, "fast").decode(jpeg_12mp, IMAGE_SETTINGS)
    # 4000x3000 / 8 = 500x375: the largest DCT scale keeping both sides >= 320.
    assert decoded.size == (500, 375)
    assert Preprocessor(real_transform(), REAL_CFG, "exact").decode(jpeg_12mp, IMAGE_SETTINGS).size == (4000, 3000)


def test_draft_never_takes_the_shorter_side_below_the_input_side(jpeg_1080p: bytes) -> None:
    decoded = decode_image(jpeg_1080p, IMAGE_SETTINGS, draft_size=320)
    assert decoded.size == (960, 540)
    small = encoded(photo((400, 330)))
    assert decode_image(small, IMAGE_SETTINGS, draft_size=320).size == (400, 330)


def test_size_limits_apply_to_the_declared_size_even_with_draft(jpeg_12mp: bytes) -> None:
    with pytest.raises(ImageError) as raised:
        decode_image(jpeg_12mp, ImageSettings(max_pixels=1_000_000), draft_size=320)
    assert raised.value.code == "image.decompression_bomb"
    with pytest.raises(ImageError) as raised:
        decode_image(jpeg_12mp, ImageSettings(max_pixels=8_000_000), draft_size=320)
    assert raised.value.code == "image.too_large"


def test_exif_orientation_is_still_applied_after_draft() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encoded(photo((2000, 1000)), exif=exif.tobytes())
    assert decode_image(data, IMAGE_SETTINGS).size == (1000, 2000)
    assert decode_image(data, IMAGE_SETTINGS, draft_size=320).size == (500, 1000)


def test_large_png_is_reduced_but_never_below_twice_the_input_side() -> None:
    data = encoded(photo((4000, 3000)), "PNG", compress_level=1)
    decoded = Preprocessor(real_transform(), REAL_CFG, "fast").decode(data, IMAGE_SETTINGS)
    assert decoded.size == (1000, 750)  # reduce(4): 3000 // (2 * 320)


def test_reduce_leaves_images_under_twice_the_side_alone() -> None:
    image = photo((700, 639))
    assert reduce_to_side(image, 320) is image
    assert reduce_to_side(photo((1280, 640)), 320).size == (640, 320)


def test_fast_png_drift_is_small() -> None:
    data = encoded(photo((4000, 3000)), "PNG", compress_level=1)
    exact = Preprocessor(real_transform(), REAL_CFG, "exact")(data, IMAGE_SETTINGS)
    fast = Preprocessor(real_transform(), REAL_CFG, "fast")(data, IMAGE_SETTINGS)
    assert fast.shape == exact.shape
    assert (fast - exact).abs().mean().item() < 0.05


def test_tensor_jpeg_path_matches_exact_mode_closely(jpeg_1080p: bytes) -> None:
    """The batched torchvision decode used on CUDA, run here on the CPU."""
    portrait = encoded(photo((1080, 1920), source_index=1), quality=90)
    batch = preprocess_jpegs([jpeg_1080p, portrait], 320, REAL_CFG["mean"], REAL_CFG["std"], "cpu")
    exact_mode = Preprocessor(real_transform(), REAL_CFG, "exact")
    exact = torch.stack([exact_mode(data, IMAGE_SETTINGS) for data in (jpeg_1080p, portrait)])
    assert batch.shape == exact.shape == (2, 3, 320, 320)
    assert (batch - exact).abs().mean().item() < 0.01
