"""Image embeddings of an evaluation dataset, cached on disk per (model identity, dataset content).

Prompt iteration only changes text features, so the second `labelstream eval`
on the same images loads one .npz instead of decoding and encoding them all.
The key also covers the image and preprocessing settings, which change the
pixels the model sees. An entry is `<key>.npz` (embeddings and which images
failed) written to a temporary file and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog

log = structlog.get_logger("labelstream.eval")


@dataclass(frozen=True)
class EncodedDataset:
    # [n_images, embed_dim] float32, L2-normalised; rows of failed images are zero.
    embeddings: np.ndarray
    # Per image: the error code when it could not be fetched or decoded, else "".
    errors: tuple[str, ...]

    @property
    def ok(self) -> np.ndarray:
        return np.array([not e for e in self.errors], dtype=bool)


def cache_key(model_identity: str, dataset_fingerprint: str, pixel_settings: dict[str, object]) -> str:
    canonical = json.dumps(
        {"model": model_identity, "dataset": dataset_fingerprint, "pixels": pixel_settings}, sort_keys=True, default=str
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "labelstream" / "eval-embeddings"


class EmbeddingCache:
    def __init__(self, directory: Path | None) -> None:
        self.directory = Path(directory) if directory is not None else None

    def path(self, key: str) -> Path | None:
        return None if self.directory is None else self.directory / f"{key}.npz"

    def load(self, key: str, n_images: int) -> EncodedDataset | None:
        path = self.path(key)
        if path is None or not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                encoded = EncodedDataset(data["embeddings"], tuple(str(e) for e in data["errors"]))
        except (OSError, ValueError, KeyError) as exc:
            log.warning("eval_embedding_cache_invalid", path=str(path), error=str(exc))
            return None
        return encoded if len(encoded.errors) == n_images else None

    def store(self, key: str, encoded: EncodedDataset) -> None:
        path = self.path(key)
        if path is None:
            return
        try:
            _write_npz(path, encoded)
        except OSError as exc:
            # Costs the next run time, not this run its result.
            log.warning("eval_embedding_cache_write_failed", path=str(path), error=str(exc))


def _write_npz(path: Path, encoded: EncodedDataset) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            np.savez(handle, embeddings=encoded.embeddings, errors=np.array(encoded.errors, dtype=str))
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
