"""Loading the open_clip model and running its two towers.

`model.name` is an open_clip model name, a path to an open_clip model-config
JSON, or an `hf-hub:`/`local-dir:` id. `model.pretrained` is a pretrained tag,
an `hf-hub:` id, or a local checkpoint path.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pipeline.config import ModelSettings
from pipeline.errors import ConfigError, InferenceError
from schemas.labels import ModelRef

_AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSource:
    """What to hand open_clip, resolved from the user's settings."""

    open_clip_name: str
    pretrained: str | None
    ref: ModelRef
    identity: str


@dataclass
class LoadedModel:
    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    preprocess_cfg: dict[str, Any]
    device: torch.device
    precision: str
    source: ModelSource
    load_seconds: float
    # Batches are padded up to the next of these sizes; see ModelSettings.batch_shapes.
    batch_shapes: tuple[int, ...] = ()
    # Effective GPU options: always False on a CPU (see gpu_options).
    pin_memory: bool = False
    channels_last: bool = False
    # The torch.compile'd image encoder, when model.compile is on and CUDA exists.
    compiled_encoder: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def ref(self) -> ModelRef:
        return self.source.ref

    @property
    def identity(self) -> str:
        return self.source.identity

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().item())

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        dtype = _AUTOCAST_DTYPES.get(self.precision)
        use_autocast = dtype is not None and self.device.type == "cuda"
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=dtype, enabled=use_autocast):
            yield

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features, float32 on the CPU, one row per input row.

        With `batch_shapes`, the batch runs padded to a configured size (in
        chunks of the largest size when it is bigger) and the padding is cut off.
        """
        try:
            with self._inference():
                parts = [self._encode_padded(chunk) for chunk in split_for_shapes(pixels, self.batch_shapes)]
        except (RuntimeError, ValueError) as exc:
            raise InferenceError(f"image encoder failed on a batch of {len(pixels)}: {exc}") from exc
        return torch.cat(parts).cpu()

    def warm_up(self) -> float:
        """Run every batch shape once on CUDA, so compiling happens before consuming starts; seconds taken."""
        if self.device.type != "cuda" or not self.batch_shapes:
            return 0.0
        started = time.perf_counter()
        side = input_side(self.preprocess_cfg)
        for shape in self.batch_shapes:
            self.encode_images(torch.zeros(shape, 3, side, side))
        torch.cuda.synchronize(self.device)
        return time.perf_counter() - started

    def _encode_padded(self, chunk: torch.Tensor) -> torch.Tensor:
        padded = pad_batch(chunk, shape_for(len(chunk), self.batch_shapes))
        encoder = self.compiled_encoder or self.model.encode_image
        features = encoder(self._to_device(padded))[: len(chunk)]
        return torch.nn.functional.normalize(features.float(), dim=-1)

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return batch.to(self.device)
        if self.pin_memory:
            batch = batch.pin_memory()
        batch = batch.to(self.device, non_blocking=self.pin_memory)
        return batch.contiguous(memory_format=torch.channels_last) if self.channels_last else batch

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text features, float32 on the CPU."""
        with self._inference():
            tokens = self.tokenizer(list(texts)).to(self.device)
            features = self.model.encode_text(tokens)
            features = torch.nn.functional.normalize(features.float(), dim=-1)
        return features.cpu()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_source(settings: ModelSettings) -> ModelSource:
    name, pretrained = settings.name, settings.pretrained
    ref = ModelRef(name=name, pretrained=pretrained)
    if pretrained and pretrained.startswith("hf-hub:"):
        # open_clip reads an hf-hub id from the model name, with config and weights.
        return ModelSource(pretrained, None, ref, f"{pretrained}")
    open_clip_name, name_identity = _resolve_name(name)
    weights, weights_identity = _resolve_pretrained(open_clip_name, pretrained)
    return ModelSource(open_clip_name, weights, ref, f"{name_identity}|{weights_identity}")


def _resolve_name(name: str) -> tuple[str, str]:
    if name.startswith("local-dir:"):
        return name, f"{name}@{_folder_digest(Path(name[len('local-dir:'):]))}"
    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"model.name: config file {path} not found")
        import open_clip

        open_clip.add_model_config(path)
        return path.stem, f"{path.stem}@{_file_digest(path)}"
    return name, name


def _resolve_pretrained(open_clip_name: str, pretrained: str | None) -> tuple[str | None, str]:
    if not pretrained:
        return None, "random-init"
    path = Path(pretrained)
    if path.is_file():
        stat = path.stat()
        return str(path), f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    if "/" in pretrained or path.suffix in {".pt", ".pth", ".bin", ".safetensors"}:
        raise ConfigError(f"model.pretrained: checkpoint file {pretrained} not found")
    _check_known_tag(open_clip_name, pretrained)
    return pretrained, pretrained


def _check_known_tag(open_clip_name: str, tag: str) -> None:
    import open_clip

    if open_clip_name.startswith(("hf-hub:", "local-dir:")):
        return
    if not open_clip.get_pretrained_cfg(open_clip_name, tag):
        known = open_clip.list_pretrained_tags_by_model(open_clip_name)
        raise ConfigError(f"model.pretrained: {tag!r} is not a pretrained tag of {open_clip_name}; known: {known}")


def _folder_digest(folder: Path) -> str:
    """Config content plus weights size and mtime: a changed checkpoint must change the identity,
    or cached classifiers and taxonomy versions would silently outlive it."""
    parts = []
    for path in sorted(folder.glob("*")) if folder.is_dir() else []:
        stat = path.stat()
        parts.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def load_model(settings: ModelSettings) -> LoadedModel:
    """Build the model exactly as open_clip would for this name and weights."""
    import open_clip

    source = resolve_source(settings)
    device = resolve_device(settings.device)
    started = time.perf_counter()
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            source.open_clip_name,
            pretrained=source.pretrained,
            device=device,
            cache_dir=str(settings.cache_dir) if settings.cache_dir else None,
        )
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot load model {settings.name} ({settings.pretrained}): {exc}", code="model.load_failed") from exc
    model.eval()
    tokenizer = open_clip.get_tokenizer(source.open_clip_name)
    options = gpu_options(settings, device)
    if options.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return LoadedModel(
        model=model,
        preprocess=preprocess,
        tokenizer=tokenizer,
        preprocess_cfg=dict(open_clip.get_model_preprocess_cfg(model)),
        device=device,
        precision=settings.precision,
        source=source,
        load_seconds=time.perf_counter() - started,
        batch_shapes=settings.batch_shapes,
        pin_memory=options.pin_memory,
        channels_last=options.channels_last,
        compiled_encoder=torch.compile(model.encode_image) if options.compile else None,
    )


@dataclass(frozen=True)
class GpuOptions:
    pin_memory: bool
    channels_last: bool
    compile: bool


def gpu_options(settings: ModelSettings, device: torch.device) -> GpuOptions:
    """The GPU settings that apply on `device`: none of them on a CPU."""
    on_cuda = device.type == "cuda"
    return GpuOptions(
        pin_memory=on_cuda and settings.pin_memory,
        channels_last=on_cuda and settings.channels_last,
        compile=on_cuda and settings.compile,
    )


def shape_for(count: int, shapes: tuple[int, ...]) -> int:
    """The smallest configured batch shape that holds `count` items; `count` itself when none does."""
    return next((shape for shape in sorted(shapes) if shape >= count), count)


def split_for_shapes(pixels: torch.Tensor, shapes: tuple[int, ...]) -> list[torch.Tensor]:
    """Chunks of at most the largest shape, so no chunk runs at an unconfigured size but the last."""
    if not shapes or len(pixels) <= max(shapes):
        return [pixels]
    return list(torch.split(pixels, max(shapes)))


def pad_batch(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """`pixels` with zero images appended up to `size` rows."""
    missing = size - len(pixels)
    if missing <= 0:
        return pixels
    return torch.cat([pixels, pixels.new_zeros((missing, *pixels.shape[1:]))])


def input_side(preprocess_cfg: dict[str, Any]) -> int:
    """The model's square input side, from open_clip's preprocess config (`size` is an int or (h, w))."""
    size = preprocess_cfg.get("size", 224)
    return int(max(size) if isinstance(size, (tuple, list)) else size)
