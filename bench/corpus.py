"""The benchmark's images and test model, generated once under bench/.cache.

Every image comes from a real photograph: scikit-learn's two sample photos
and the conformal-clip-data wheel's 2,000 textile photos (250x250). Each is a
random crop with the target's aspect ratio, resized to one of a fixed cycle of
sizes up to 1920x1080; upscaled crops get mild sensor-like noise so that their
JPEG entropy (and so the decode cost) resembles a camera photo's rather than a
smooth upscale's. Files are named by index and made on demand, so a quick run
only pays for the few it uses.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

CACHE_DIR = Path(__file__).resolve().parent / ".cache"
CORPUS_VERSION = "v1"
# Landscape and portrait sizes of real uploads, up to 1080p; 250x250 is the textile originals' size.
MIXED_SIZES: tuple[tuple[int, int], ...] = (
    (250, 250), (640, 480), (800, 600), (1024, 768), (1280, 720), (720, 1280), (1600, 900), (1920, 1080),
)  # fmt: skip
TINY_CONFIG = Path(__file__).resolve().parent.parent / "pipeline" / "data" / "tiny-convnext-clip.json"


def mixed_jpegs(count: int) -> list[Path]:
    """`count` distinct JPEGs cycling through MIXED_SIZES."""
    return [_ensure(f"mixed/{index:05d}.jpg", index, MIXED_SIZES[index % len(MIXED_SIZES)]) for index in range(count)]


def sized_jpegs(count: int, size: tuple[int, int]) -> list[Path]:
    """`count` distinct JPEGs of exactly `size` (e.g. 1920x1080, or 4000x3000 from upscaled photos)."""
    folder = f"{size[0]}x{size[1]}"
    return [_ensure(f"{folder}/{index:03d}.jpg", 100_000 + index, size) for index in range(count)]


def _ensure(relative: str, seed: int, size: tuple[int, int]) -> Path:
    path = CACHE_DIR / f"corpus-{CORPUS_VERSION}" / relative
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        _photo_variant(seed, size).save(temporary, "JPEG", quality=85 + seed % 11)
        temporary.replace(path)
    return path


def _photo_variant(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    # Every fifth image is a scene photo; the rest are textile close-ups.
    source = _scene_photos()[seed % 2] if seed % 5 == 0 else _textile_photo(seed)
    image = _random_crop(source, size, rng).resize(size, Image.Resampling.BICUBIC)
    if size[0] * size[1] > 1.5 * source.size[0] * source.size[1]:
        image = _with_sensor_noise(image, rng)
    return image


def _random_crop(image: Image.Image, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    width, height = image.size
    aspect = size[0] / size[1]
    crop_w = min(width, int(height * aspect))
    crop_w = int(crop_w * rng.uniform(0.7, 1.0))
    crop_h = max(1, min(height, int(crop_w / aspect)))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    return image.crop((left, top, left + crop_w, top + crop_h))


def _with_sensor_noise(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    pixels = np.asarray(image, dtype=np.int16)
    noise = rng.normal(0.0, 3.0, size=pixels.shape[:2] + (1,)).astype(np.int16)
    return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))


@lru_cache(maxsize=1)
def _scene_photos() -> list[Image.Image]:
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(pixels) for pixels in load_sample_images().images]


def _textile_photo(seed: int) -> Image.Image:
    paths = _textile_paths()
    with Image.open(paths[seed % len(paths)]) as image:
        return image.convert("RGB")


@lru_cache(maxsize=1)
def _textile_paths() -> list[Path]:
    from labelstream.sample_photos import textile_photos

    return textile_photos()


def tiny_model_files(image_size: int = 64) -> tuple[Path, Path]:
    """(config JSON, checkpoint) of the tests' tiny model, seed 0; at another input size when asked.

    The 64 px original is the tests' model. A 320 px copy (same weights; a
    convnet takes any input size) gives the drift figures a top-1 agreement
    at the real model's input size.
    """
    config = TINY_CONFIG
    if image_size != 64:
        config = CACHE_DIR / f"tiny-convnext-clip-{image_size}.json"
        spec = json.loads(TINY_CONFIG.read_text())
        spec["vision_cfg"]["image_size"] = image_size
        _write_if_changed(config, json.dumps(spec, indent=2))
    return config, _tiny_checkpoint()


def _tiny_checkpoint() -> Path:
    import open_clip
    import torch

    path = CACHE_DIR / "tiny-convnext-clip-seed0.pt"
    if not path.is_file():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        open_clip.add_model_config(TINY_CONFIG)
        torch.manual_seed(0)
        model = open_clip.create_model(TINY_CONFIG.stem, pretrained=None)
        torch.save(model.state_dict(), path)
    return path


def _write_if_changed(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
