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
        """L2-normalised image features, float32 on the CPU."""
        try:
            with self._inference():
                features = self.model.encode_image(pixels.to(self.device, non_blocking=True))
                features = torch.nn.functional.normalize(features.float(), dim=-1)
        except (RuntimeError, ValueError) as exc:
            raise InferenceError(f"image encoder failed on a batch of {len(pixels)}: {exc}") from exc
        return features.cpu()

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
    return LoadedModel(
        model=model,
        preprocess=preprocess,
        tokenizer=tokenizer,
        preprocess_cfg=dict(open_clip.get_model_preprocess_cfg(model)),
        device=device,
        precision=settings.precision,
        source=source,
        load_seconds=time.perf_counter() - started,
    )
