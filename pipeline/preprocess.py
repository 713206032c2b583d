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
resize keeps at least a 2x reduction to do. The pixels still differ slightly
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

    @classmethod
    def for_model(cls, model: LoadedModel, settings: PreprocessSettings) -> Preprocessor:
        return cls(model.preprocess, model.preprocess_cfg, settings.mode)

    def __call__(self, data: bytes, image_settings: ImageSettings) -> torch.Tensor:
        return self.transform(self.decode(data, image_settings))

    def decode(self, data: bytes, image_settings: ImageSettings) -> Image.Image:
        """The RGB image the transform sees: full size (exact) or cheaply shrunk (fast)."""
        if self.mode == "exact":
            return decode_image(data, image_settings)
        image = decode_image(data, image_settings, draft_size=self.target_side)
        return reduce_to_side(image, 2 * self.target_side)


def reduce_to_side(image: Image.Image, side: int) -> Image.Image:
    """Box-shrink by the largest integer factor that keeps the shorter side >= `side`."""
    factor = min(image.size) // side
    return image.reduce(factor) if factor >= 2 else image
