"""Batched JPEG decoding and preprocessing on the accelerator (nvJPEG through torchvision).

On a 16-core machine CPU decoding tops out near 1,000 1080p JPEGs/s, below
what the model's image tower can take on one H200, so on CUDA the JPEGs can be
decoded where the model runs. The preprocessing mirrors open_clip's eval
transform (shorter side to `side` with antialiased bicubic, centre crop,
normalise) in tensor ops; the pixels differ slightly from Pillow's.

Only torch and torchvision are imported, so `bench/gpu.py` can use this module
on a machine without the rest of labelstream's dependencies. It does not apply
the decompression-bomb limits: callers check the declared size first.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def decode_jpegs(datas: Sequence[bytes], device: torch.device | str) -> list[torch.Tensor]:
    """Decode JPEG bytes to uint8 CHW RGB tensors on `device`, in one batched call."""
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in datas]
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image codecs in favour of torchcodec; they still work.
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

        decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
    return list(decoded)


def resize_crop_normalize(
    image: torch.Tensor, side: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """uint8 CHW -> float CHW: shorter side to `side`, centre crop `side`x`side`, normalise."""
    size = _shorter_side_to(image.shape[-2], image.shape[-1], side)
    resized = F.interpolate(image[None].float(), size=size, mode="bicubic", antialias=True, align_corners=False)[0]
    # Pillow rounds to 8 bits after resizing; doing the same keeps the drift from exact mode small.
    resized = resized.round_().clamp_(0, 255)
    top, left = round((size[0] - side) / 2), round((size[1] - side) / 2)
    cropped = resized[:, top : top + side, left : left + side] / 255.0
    mean_t = torch.tensor(mean, device=image.device).view(3, 1, 1)
    std_t = torch.tensor(std, device=image.device).view(3, 1, 1)
    return (cropped - mean_t) / std_t


def _shorter_side_to(height: int, width: int, side: int) -> tuple[int, int]:
    # torchvision's Resize(int) truncates the longer side; so does open_clip's eval transform.
    if height <= width:
        return side, int(side * width / height)
    return int(side * height / width), side


def preprocess_jpegs(
    datas: Sequence[bytes], side: int, mean: Sequence[float], std: Sequence[float], device: torch.device | str
) -> torch.Tensor:
    """A model-ready [N, 3, side, side] float batch on `device`."""
    images = decode_jpegs(datas, device)
    return torch.stack([resize_crop_normalize(image, side, mean, std) for image in images])
