"""fast_vs_exact_preprocess: decode + preprocess images/s per core, and how far fast mode drifts.

Per core: one thread, timed with that thread's CPU clock, so other processes
on the machine do not count against it. The transform is the real model's
(convnext_large_d_320: 320 px, bicubic, centre crop, OpenAI mean/std).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch

from bench.corpus import tiny_model_files
from bench.stream import relative_standard_error
from pipeline.config import ImageSettings, Settings
from pipeline.preprocess import Preprocessor
from pipeline.taxonomy import everyday_taxonomy_path

REAL_SIDE = 320
# open_clip.get_model_preprocess_cfg() of convnext_large_d_320 (checked in tests/test_preprocess_fast.py).
REAL_CFG = {
    "size": (REAL_SIDE, REAL_SIDE),
    "mean": open_clip.OPENAI_DATASET_MEAN,
    "std": open_clip.OPENAI_DATASET_STD,
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}
IMAGE_SETTINGS = ImageSettings()


@dataclass(frozen=True)
class SpeedResult:
    exact_per_core: float
    fast_per_core: float
    ratio: float
    noise: float


@dataclass(frozen=True)
class Drift:
    mean_abs: float
    max_abs: float
    top1_agreement: float
    images: int


def preprocessors() -> tuple[Preprocessor, Preprocessor]:
    transform = open_clip.image_transform(REAL_SIDE, is_train=False)
    return Preprocessor(transform, REAL_CFG, "exact"), Preprocessor(transform, REAL_CFG, "fast")


def compare_speed(files: list[Path], seconds: float, repeats: int) -> SpeedResult:
    """Alternate exact and fast `repeats` times: mean rates, and the relative standard error of the ratio."""
    datas = [path.read_bytes() for path in files]
    exact, fast = preprocessors()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pairs = [(_per_core_rate(exact, datas, seconds), _per_core_rate(fast, datas, seconds)) for _ in range(repeats)]
    finally:
        torch.set_num_threads(threads)
    ratios = [f / e for e, f in pairs]
    exact_rate, fast_rate = statistics.fmean(p[0] for p in pairs), statistics.fmean(p[1] for p in pairs)
    return SpeedResult(exact_rate, fast_rate, statistics.fmean(ratios), relative_standard_error(ratios))


def _per_core_rate(preprocess: Preprocessor, datas: list[bytes], seconds: float) -> float:
    done, started = 0, time.thread_time()
    while time.thread_time() - started < seconds or done < len(datas):
        preprocess(datas[done % len(datas)], IMAGE_SETTINGS)
        done += 1
    return done / (time.thread_time() - started)


def measure_drift(files: list[Path]) -> Drift:
    """Model-input differences, and top-1 agreement of the tiny model (seed 0) at 320 px."""
    exact, fast = preprocessors()
    datas = [path.read_bytes() for path in files]
    exact_inputs = [exact(data, IMAGE_SETTINGS) for data in datas]
    fast_inputs = [fast(data, IMAGE_SETTINGS) for data in datas]
    diffs = [(a - b).abs() for a, b in zip(exact_inputs, fast_inputs, strict=True)]
    top1 = _top1_labeler()
    agree = [a == b for a, b in zip(top1(exact_inputs), top1(fast_inputs), strict=True)]
    return Drift(
        mean_abs=float(torch.stack([d.mean() for d in diffs]).mean()),
        max_abs=float(max(d.max() for d in diffs)),
        top1_agreement=sum(agree) / len(agree),
        images=len(agree),
    )


def _top1_labeler() -> Callable[[list[torch.Tensor]], list[str]]:
    from pipeline.labeler import build_labeler

    config, checkpoint = tiny_model_files(REAL_SIDE)
    settings = Settings.model_validate({
        "model": {"name": str(config), "pretrained": str(checkpoint), "device": "cpu"},
        "taxonomy": {"path": str(everyday_taxonomy_path()), "feed_enabled": False, "watch_interval_s": 0},
    })
    labeler = build_labeler(settings)
    classifier = labeler.classifier_for(None)

    def top1(inputs: list[torch.Tensor]) -> list[str]:
        found: list[str] = []
        for start in range(0, len(inputs), 32):
            chunk = inputs[start : start + 32]
            found += [result.labels[0][0] for result in labeler.label(chunk, [classifier] * len(chunk))]
        return found

    return top1
