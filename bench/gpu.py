"""GPU benchmark: model-only throughput of the real architecture, and the offline classify path.

    python bench/gpu.py                          # on the GPU machine, about 7 minutes; writes to $OUT
    python bench/gpu.py --device cpu --quick     # seconds, anywhere (the test suite runs this)

Writes gpu-bench.json and gpu-bench.md to --out (default $OUT, else bench/.cache/gpu).

Sections, in the order they run (results are written after each, so a run cut
short still leaves what it measured):

1. model only, eager: convnext_large_d_320's image tower with random weights,
   bf16 vs fp16 autocast, channels_last on and off, batch 64/128/256/512:
   img/s, achieved TFLOP/s (140.25 GFLOP per image) and peak GPU memory.
2. the offline classify path on synthetic 1080p JPEGs: decode + preprocess +
   model + zero-shot scores, with CPU decoding (Pillow on every core, exact
   and fast mode) against batched GPU decoding (torchvision.io.decode_jpeg on
   CUDA, pipeline/gpu_decode.py).
3. model only, torch.compile: the same grid, best configurations first, for
   as long as the time budget allows (each new shape compiles afresh).

Only torch, torchvision, numpy, Pillow and open_clip are needed (the GPU
machine has no pydantic or Kafka client), so the CPU preprocessing below
mirrors pipeline/preprocess.py instead of importing it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from pipeline.gpu_decode import preprocess_jpegs  # noqa: E402  (needs only torch and torchvision)

REAL_MODEL = "convnext_large_d_320"
TINY_CONFIG = REPO_ROOT / "pipeline" / "data" / "tiny-convnext-clip.json"
GFLOP_PER_IMAGE = 140.25
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Plan:
    device: str
    model: str
    batch_sizes: tuple[int, ...]
    precisions: tuple[str, ...]
    classify_images: int
    classify_batch: int
    min_seconds: float
    budget_s: float
    compile: bool


@dataclass
class Report:
    environment: dict[str, Any]
    model_only: list[dict[str, Any]] = field(default_factory=list)
    classify: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


@dataclass
class Clock:
    budget_s: float
    started: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)


# -- set-up -----------------------------------------------------------------


def build_model(name: str, device: str) -> tuple[torch.nn.Module, int]:
    """(CLIP model with random weights, eval mode, on `device`; its input side)."""
    import open_clip

    if name.endswith(".json"):
        open_clip.add_model_config(name)
        name = Path(name).stem
    model = open_clip.create_model(name, pretrained=None, device=device)
    size = open_clip.get_model_preprocess_cfg(model)["size"]
    side = int(max(size) if isinstance(size, (tuple, list)) else size)
    return model.eval(), side


def synthetic_jpegs(count: int, size: tuple[int, int], seed: int = 0) -> list[bytes]:
    """Photo-like JPEGs: smooth colour fields, edges and sensor noise, quality 90."""
    rng = np.random.default_rng(seed)
    width, height = size
    low = rng.random((count, height // 60 + 2, width // 60 + 2, 3))
    jpegs = []
    for index in range(count):
        base = Image.fromarray((low[index] * 255).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)
        pixels = np.asarray(base, dtype=np.int16) + rng.normal(0, 6, (height, width, 1)).astype(np.int16)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    return jpegs


def environment(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "device": device, "cpus": os.cpu_count(),
                            "python": sys.version.split()[0]}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return info


# -- timing -------------------------------------------------------------------


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def time_calls(run: Callable[[], Any], device: str, min_seconds: float, min_calls: int = 3) -> float:
    """Seconds per call: the median of calls made for at least `min_seconds`."""
    durations: list[float] = []
    while sum(durations) < min_seconds or len(durations) < min_calls:
        started = time.perf_counter()
        run()
        synchronize(device)
        durations.append(time.perf_counter() - started)
    return statistics.median(durations)


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.startswith("cuda") else None


def tflops(images_per_s: float, model: str) -> float | None:
    return round(images_per_s * GFLOP_PER_IMAGE / 1000, 1) if model == REAL_MODEL else None


# -- model only ---------------------------------------------------------------


Encoder = Callable[[torch.Tensor], torch.Tensor]


def encoder(model: torch.nn.Module, precision: str, device: str, compiled: bool) -> Encoder:
    device_type = "cuda" if device.startswith("cuda") else "cpu"

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type, dtype=DTYPES[precision]):
            return model.encode_image(pixels)

    return torch.compile(encode) if compiled else encode


def set_channels_last(model: torch.nn.Module, on: bool) -> None:
    model.to(memory_format=torch.channels_last if on else torch.contiguous_format)


def measure_model(
    model: torch.nn.Module, side: int, plan: Plan, precision: str, channels_last: bool, batch: int, compiled: bool,
    encode: Callable[[torch.Tensor], torch.Tensor],
) -> dict[str, Any]:  # fmt: skip
    pixels = torch.randn(batch, 3, side, side, device=plan.device)
    if channels_last:
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    reset_peak(plan.device)
    with torch.inference_mode():
        started = time.perf_counter()
        encode(pixels)
        synchronize(plan.device)
        first_s = time.perf_counter() - started
        per_call = time_calls(lambda: encode(pixels), plan.device, plan.min_seconds)
    rate = batch / per_call
    return {
        "precision": precision, "compile": compiled, "channels_last": channels_last, "batch": batch,
        "img_per_s": round(rate, 1), "tflops": tflops(rate, plan.model), "peak_gib": peak_gib(plan.device),
        "first_call_s": round(first_s, 2),
    }  # fmt: skip


def model_grid(plan: Plan, compiled: bool) -> Iterator[tuple[str, bool, int]]:
    """(precision, channels_last, batch): the likely-best configurations first, for the compile budget's sake."""
    batches = sorted(plan.batch_sizes, key=lambda b: (abs(b - 256), b)) if compiled else plan.batch_sizes
    for precision in plan.precisions:
        for channels_last in (True, False):
            for batch in batches:
                yield precision, channels_last, batch


def run_model_section(model: torch.nn.Module, side: int, plan: Plan, compiled: bool, report: Report, clock: Clock,
                      out: Path) -> None:  # fmt: skip
    encoders: dict[tuple[str, bool], Encoder] = {}
    for precision, channels_last, batch in model_grid(plan, compiled):
        label = f"model {precision} {'compile' if compiled else 'eager'} cl={channels_last} b={batch}"
        # A compile of this model takes a minute or more; do not start one without the time for it.
        if clock.left() < (90 if compiled else 10):
            report.skipped.append(f"{label}: time budget spent")
            continue
        set_channels_last(model, channels_last)
        encode = encoders.setdefault((precision, channels_last), encoder(model, precision, plan.device, compiled))
        try:
            result: Any = measure_model(model, side, plan, precision, channels_last, batch, compiled, encode)
            report.model_only.append(result)
        except RuntimeError as exc:  # out of memory at batch 512, a compile failure
            result = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            report.skipped.append(f"{label}: {result}")
        print(f"[gpu-bench] {label}: {result}", file=sys.stderr, flush=True)
        write_outputs(report, out)


# -- offline classify path ----------------------------------------------------


class CpuPreprocess:
    """Decode + preprocess one JPEG on the CPU: pipeline/preprocess.py when it imports, else a mirror of it."""

    def __init__(self, side: int, fast: bool) -> None:
        import open_clip

        self.side, self.fast = side, fast
        self.transform = open_clip.image_transform(side, is_train=False)
        self.source, self._run = self._pipeline_preprocessor() or ("mirror in bench/gpu.py (draft only)", self._mirror)

    def __call__(self, data: bytes) -> torch.Tensor:
        return self._run(data)

    def _pipeline_preprocessor(self) -> tuple[str, Callable[[bytes], torch.Tensor]] | None:
        try:
            from pipeline.config import ImageSettings
            from pipeline.preprocess import Preprocessor
        except ImportError:  # the GPU machine may lack pydantic
            return None
        import open_clip

        cfg = {
            "size": (self.side, self.side), "mean": open_clip.OPENAI_DATASET_MEAN,
            "std": open_clip.OPENAI_DATASET_STD, "interpolation": "bicubic", "resize_mode": "shortest",
        }  # fmt: skip
        preprocessor = Preprocessor(self.transform, cfg, "fast" if self.fast else "exact")
        settings = ImageSettings()
        return "pipeline.preprocess", lambda data: preprocessor(data, settings)

    def _mirror(self, data: bytes) -> torch.Tensor:
        with Image.open(io.BytesIO(data)) as image:
            if self.fast:
                image.draft("RGB", (self.side, self.side))
            return self.transform(image.convert("RGB"))


def classify_path(
    model: torch.nn.Module, side: int, plan: Plan, jpegs: list[bytes], decode: str, text_weights: torch.Tensor
) -> dict[str, Any]:
    """Images/s through decode, preprocess, the image tower (bf16, channels_last on CUDA) and scoring."""
    on_cuda = plan.device.startswith("cuda")
    set_channels_last(model, on_cuda)
    encode = encoder(model, "bf16", plan.device, compiled=False)
    batches = [jpegs[i : i + plan.classify_batch] for i in range(0, len(jpegs), plan.classify_batch)]
    make_pixels, preprocess_source = _pixel_source(decode, side, plan.device)
    reset_peak(plan.device)
    started = time.perf_counter()
    with torch.inference_mode():
        for pixels in make_pixels(batches):
            features = torch.nn.functional.normalize(encode(pixels).float(), dim=-1)
            (100.0 * features @ text_weights).softmax(dim=-1).topk(5, dim=-1).indices.cpu()
    synchronize(plan.device)
    rate = len(jpegs) / (time.perf_counter() - started)
    # torchvision decodes where the model runs: nvJPEG on CUDA.
    where = "cpu" if decode.startswith("cpu") or not on_cuda else "gpu"
    return {"decode": decode, "decode_device": where, "images": len(jpegs), "batch": plan.classify_batch,
            "img_per_s": round(rate, 1), "peak_gib": peak_gib(plan.device),
            "cpu_threads": os.cpu_count() if decode.startswith("cpu") else None, "preprocess": preprocess_source}


PixelSource = Callable[[list[list[bytes]]], Iterator[torch.Tensor]]


def _pixel_source(decode: str, side: int, device: str) -> tuple[PixelSource, str]:
    if decode == "torchvision":
        import open_clip

        mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
        source: PixelSource = lambda batches: (preprocess_jpegs(b, side, mean, std, device) for b in batches)  # noqa: E731
        return source, "pipeline.gpu_decode"
    preprocess = CpuPreprocess(side, fast=decode == "cpu-fast")
    return (lambda batches: _cpu_batches(batches, preprocess, device)), preprocess.source


def _cpu_batches(batches: list[list[bytes]], preprocess: CpuPreprocess, device: str) -> Iterator[torch.Tensor]:
    """Decode on every core, two batches ahead of the model; pinned, non-blocking copies on CUDA."""
    on_cuda = device.startswith("cuda")
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        pending: list[list[Future[torch.Tensor]]] = []
        for batch in batches[:2]:
            pending.append([pool.submit(preprocess, data) for data in batch])
        for index in range(len(batches)):
            ready = torch.stack([future.result() for future in pending.pop(0)])
            if index + 2 < len(batches):
                pending.append([pool.submit(preprocess, data) for data in batches[index + 2]])
            yield ready.pin_memory().to(device, non_blocking=True) if on_cuda else ready


def run_classify_section(model: torch.nn.Module, side: int, plan: Plan, report: Report, out: Path) -> None:
    unique = synthetic_jpegs(min(64, plan.classify_images), (1920, 1080))
    jpegs = [unique[i % len(unique)] for i in range(plan.classify_images)]
    embed_dim = int(model.text_projection.shape[-1]) if hasattr(model, "text_projection") else 768
    text_weights = torch.nn.functional.normalize(torch.randn(embed_dim, 1000, device=plan.device), dim=0)
    threads = torch.get_num_threads()
    # Decoding threads each run one image; intra-op threads would only fight them.
    torch.set_num_threads(1)
    try:
        for decode in ("cpu-exact", "cpu-fast", "torchvision"):
            try:
                result: Any = classify_path(model, side, plan, jpegs, decode, text_weights)
                report.classify.append(result)
            except RuntimeError as exc:
                result = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                report.skipped.append(f"classify {decode}: {result}")
            print(f"[gpu-bench] classify {decode}: {result}", file=sys.stderr, flush=True)
            write_outputs(report, out)
    finally:
        torch.set_num_threads(threads)


# -- outputs ------------------------------------------------------------------


def write_outputs(report: Report, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-bench.json").write_text(json.dumps(asdict(report), indent=2))
    (out / "gpu-bench.md").write_text(markdown(report))


def markdown(report: Report) -> str:
    env = report.environment
    lines = [f"# GPU benchmark: {env.get('model')} on {env.get('gpu', env.get('device'))}", "",
             f"torch {env.get('torch')}, {env.get('cpus')} CPUs, {GFLOP_PER_IMAGE} GFLOP per image "
             "(2 FLOPs per multiply-add); random weights; autocast.", "", "## Model only (image tower)", "",
             "| precision | compile | channels_last | batch | img/s | TFLOP/s | peak GiB | first call s |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in report.model_only:
        compiled, channels_last = "yes" if r["compile"] else "no", "on" if r["channels_last"] else "off"
        lines.append(f"| {r['precision']} | {compiled} | {channels_last} | {r['batch']} | {r['img_per_s']} "
                     f"| {r['tflops'] or '-'} | {r['peak_gib'] or '-'} | {r['first_call_s']} |")
    lines += ["", "## Offline classify path, synthetic 1920x1080 JPEGs", "",
              "| decode | decoded on | images | batch | img/s | peak GiB |", "|---|---|---|---|---|---|"]
    for r in report.classify:
        lines.append(f"| {r['decode']} | {r['decode_device']} | {r['images']} | {r['batch']} | {r['img_per_s']} "
                     f"| {r['peak_gib'] or '-'} |")
    if report.skipped:
        lines += ["", "## Skipped", "", *(f"- {reason}" for reason in report.skipped)]
    return "\n".join(lines) + "\n"


# -- main ---------------------------------------------------------------------


def plan_from(args: argparse.Namespace) -> Plan:
    quick = args.quick
    return Plan(
        device=args.device,
        model=args.model or (str(TINY_CONFIG) if quick else REAL_MODEL),
        batch_sizes=tuple(args.batch_sizes or ((2, 4) if quick else (64, 128, 256, 512))),
        precisions=("bf16", "fp16"),
        classify_images=args.classify_images or (8 if quick else 2048),
        classify_batch=4 if quick else 256,
        min_seconds=0.05 if quick else 1.5,
        budget_s=args.budget_s,
        compile=args.compile if args.compile is not None else not quick,
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    plan = plan_from(args)
    out = Path(args.out or os.environ.get("OUT") or REPO_ROOT / "bench" / ".cache" / "gpu")
    clock = Clock(plan.budget_s)
    if plan.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    model, side = build_model(plan.model, plan.device)
    report = Report(environment={**environment(plan.device), "model": Path(plan.model).stem, "side": side,
                                 "plan": asdict(plan)})
    run_model_section(model, side, plan, compiled=False, report=report, clock=clock, out=out)
    run_classify_section(model, side, plan, report, out)
    if plan.compile:
        run_model_section(model, side, plan, compiled=True, report=report, clock=clock, out=out)
    else:
        report.skipped.append("torch.compile: not requested (--compile)")
    write_outputs(report, out)
    print(markdown(report))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny model and batches: seconds, for tests")
    parser.add_argument("--model", help=f"open_clip name or config JSON (default {REAL_MODEL}; tiny with --quick)")
    parser.add_argument("--batch-sizes", type=int, nargs="+")
    parser.add_argument("--classify-images", type=int)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also measure torch.compile (default: on unless --quick)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting new measurements after this")
    parser.add_argument("--out", help="output folder (default $OUT)")
    return parser


if __name__ == "__main__":
    sys.exit(main())
