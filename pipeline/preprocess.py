"""Image bytes to the model's input tensor, in `exact` or `fast` mode.

exact: `decode_image` at full size, then open_clip's eval transform (bicubic
resize of the shorter side, centre crop, normalise): open_clip's own numbers.

fast: the decoder does most of the downscaling cheaply before that same
transform runs. A JPEG decodes at 1/2, 1/4 or 1/8 scale in the DCT domain
(Pillow's `draft`), never below the model's input side; then any image still
at least four times the input side is box-averaged with `Image.reduce()`,
never below twice the input side. Reducing further measurably hurts: a box
filter followed by a near-1:1 bicubic resize drifted 0.10 (mean abs, in
normalised units) from exact mode at 64 px, against 0.01 when the bicubic
resize keeps at least a 2x reduction to do. Finally, for open_clip's usual
`shortest` resize mode, the centre crop is folded into the resize: one
resize of just the box the crop keeps, so the discarded edges of a 16:9 photo
are never filtered (about 45% less resizing). The pixels still differ slightly
from exact mode (measured by `make bench`), which is why it is a setting and
not the default.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from pipeline.config import ImageSettings, PreprocessSettings
from pipeline.decode import decode_image
from pipeline.model import LoadedModel, input_side

Transform = Callable[[Image.Image], torch.Tensor]
_RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


class Preprocessor:
    """Decode and preprocess one image; thread-safe (no shared mutable state)."""

    def __init__(self, transform: Transform, preprocess_cfg: dict[str, Any], mode: str = "exact") -> None:
        if mode not in ("exact", "fast"):
            raise ValueError(f"preprocess mode must be exact or fast, not {mode!r}")
        self.transform = transform
        self.mode = mode
        # Every resize mode open_clip has keeps the result at most this big on
        # either side, so a shorter side of at least this never upsamples.
        self.target_side = input_side(preprocess_cfg)
        fused = FusedCropResize.from_cfg(preprocess_cfg) if mode == "fast" else None
        self._fast_transform = fused or transform

    @classmethod
    def for_model(cls, model: LoadedModel, settings: PreprocessSettings) -> Preprocessor:
        return cls(model.preprocess, model.preprocess_cfg, settings.mode)

    def __call__(self, data: bytes, image_settings: ImageSettings) -> torch.Tensor:
        if self.mode == "exact":
            return self.transform(self.decode(data, image_settings))
        return self._fast_transform(self.decode(data, image_settings))

    def decode(self, data: bytes, image_settings: ImageSettings) -> Image.Image:
        """The RGB image the transform sees: full size (exact) or cheaply shrunk (fast)."""
        if self.mode == "exact":
            return decode_image(data, image_settings)
        image = decode_image(data, image_settings, draft_size=self.target_side)
        return reduce_to_side(image, 2 * self.target_side)


class FusedCropResize:
    """open_clip's `shortest` eval transform with the centre crop folded into the resize.

    Resizing the shorter side to `side` and then cropping the centre samples
    the same source box as one resize of just that box; Pillow's `box`
    argument takes fractional coordinates and still filters across its edges.
    """

    def __init__(self, side: int, resample: Image.Resampling, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.side, self.resample = side, resample
        self.mean, self.std = list(mean), list(std)

    @classmethod
    def from_cfg(cls, cfg: dict[str, Any]) -> FusedCropResize | None:
        """None for configurations it does not reproduce (other resize modes, non-square input)."""
        size = cfg.get("size")
        square = isinstance(size, int) or (isinstance(size, (tuple, list)) and len(set(size)) == 1)
        resample = _RESAMPLING.get(cfg.get("interpolation", "bicubic"))
        if not square or cfg.get("resize_mode", "shortest") != "shortest" or resample is None or "mean" not in cfg:
            return None
        return cls(input_side(cfg), resample, tuple(cfg["mean"]), tuple(cfg["std"]))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        from torchvision.transforms.functional import normalize, to_tensor

        cropped = image.resize((self.side, self.side), self.resample, box=centre_crop_box(image.size, self.side))
        return normalize(to_tensor(cropped), self.mean, self.std)


def centre_crop_box(size: tuple[int, int], side: int) -> tuple[float, float, float, float]:
    """The source box that torchvision's Resize(side) then CenterCrop(side) keeps."""
    width, height = size
    # torchvision truncates the longer side, and rounds the crop offset.
    resized = (side, int(side * height / width)) if width <= height else (int(side * width / height), side)
    left, top = int(round((resized[0] - side) / 2.0)), int(round((resized[1] - side) / 2.0))
    scale_x, scale_y = width / resized[0], height / resized[1]
    return (left * scale_x, top * scale_y, (left + side) * scale_x, (top + side) * scale_y)


def reduce_to_side(image: Image.Image, side: int) -> Image.Image:
    """Box-shrink by the largest integer factor that keeps the shorter side >= `side`."""
    factor = min(image.size) // side
    return image.reduce(factor) if factor >= 2 else image
