"""GPU settings on the CPU: only batch-shape padding applies, and it changes no result."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from pipeline.config import ModelSettings
from pipeline.model import LoadedModel, gpu_options, load_model, pad_batch, shape_for, split_for_shapes


@pytest.fixture(scope="module")
def padded_model(tiny_model: Any) -> LoadedModel:
    return load_model(ModelSettings(
        name=str(tiny_model.config_path), pretrained=str(tiny_model.checkpoint_path), device="cpu",
        batch_shapes=(4, 8), compile=True, channels_last=True, pin_memory=True,
    ))


def test_batch_shapes_are_sorted_unique_and_positive() -> None:
    assert ModelSettings(batch_shapes=(32, 8, 8, 16)).batch_shapes == (8, 16, 32)
    with pytest.raises(ValueError):
        ModelSettings(batch_shapes=(0, 8))


def test_shape_for_picks_the_smallest_shape_that_fits() -> None:
    assert shape_for(1, (4, 8)) == 4
    assert shape_for(5, (4, 8)) == 8
    assert shape_for(9, (4, 8)) == 9
    assert shape_for(3, ()) == 3


def test_split_and_pad() -> None:
    pixels = torch.arange(19.0).view(19, 1)
    chunks = split_for_shapes(pixels, (4, 8))
    assert [len(c) for c in chunks] == [8, 8, 3]
    padded = pad_batch(chunks[-1], shape_for(3, (4, 8)))
    assert padded.shape == (4, 1) and torch.equal(padded[:3], chunks[-1]) and padded[3].item() == 0


def test_gpu_options_are_off_on_a_cpu() -> None:
    settings = ModelSettings(compile=True, channels_last=True, pin_memory=True)
    options = gpu_options(settings, torch.device("cpu"))
    assert not (options.pin_memory or options.channels_last or options.compile)
    assert gpu_options(settings, torch.device("cuda")).compile


@pytest.mark.parametrize("count", [1, 3, 4, 5, 8, 11, 19])
def test_padded_results_equal_unpadded_results(padded_model: LoadedModel, count: int) -> None:
    assert padded_model.compiled_encoder is None and not padded_model.channels_last
    pixels = torch.randn(count, 3, 64, 64, generator=torch.Generator().manual_seed(count))
    padded = padded_model.encode_images(pixels)
    with torch.inference_mode():
        unpadded = torch.cat([
            torch.nn.functional.normalize(padded_model.model.encode_image(pixels[i : i + 1]).float(), dim=-1)
            for i in range(count)
        ])
    assert padded.shape == (count, unpadded.shape[1])
    torch.testing.assert_close(padded, unpadded, atol=1e-5, rtol=1e-4)


def test_warm_up_is_a_no_op_on_a_cpu(padded_model: LoadedModel) -> None:
    assert padded_model.warm_up() == 0.0
