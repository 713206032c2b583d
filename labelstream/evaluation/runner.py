"""Encoding a dataset with the worker's own engine, and scoring the embeddings with a taxonomy.

Images go through `Labeler.prepare`/`prepare_bytes` (fetch, decode,
preprocess) on a thread pool and `Labeler.label` (one model call per batch),
the same two steps the worker runs, so what eval measures is what the stream
does. Preparing runs ahead of the model by a few batches (pipelined), and the
model sees batches of `batch.max_size`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog
import torch
from prometheus_client import Counter
from tqdm import tqdm

from labelstream.evaluation.dataset import Dataset
from labelstream.evaluation.embedding_cache import EmbeddingCache, EncodedDataset, cache_key
from labelstream.sources import is_s3_uri, read_local_image, s3_source
from pipeline.classifier import ZeroShotClassifier
from pipeline.config import Settings
from pipeline.errors import LabelstreamError
from pipeline.fetch import ImageFetcher
from pipeline.labeler import Labeler, PreparedImage

log = structlog.get_logger("labelstream.eval")

IMAGES_ENCODED = Counter("labelstream_eval_images_encoded", "Images eval ran through the image encoder")
EMBEDDING_CACHE_HITS = Counter("labelstream_eval_embedding_cache_hits", "Eval runs that loaded cached image embeddings")
# Batches prepared ahead of the model: enough to hide decode behind inference, bounded for memory.
_LOOKAHEAD_BATCHES = 3
_SCORE_CHUNK = 4096


@dataclass(frozen=True)
class EncodeOutcome:
    encoded: EncodedDataset
    cache_hit: bool
    images_encoded: int
    seconds: float


def read_image_bytes(location: str, fetcher: ImageFetcher, max_bytes: int) -> bytes:
    """A dataset image's bytes, through the worker's S3 fetcher or from disk."""
    if is_s3_uri(location):
        return fetcher.fetch(s3_source(location))
    return read_local_image(Path(location), max_bytes)


def pixel_settings(settings: Settings) -> dict[str, object]:
    """The settings that change what the model sees, so they key the embedding cache."""
    return {"image": settings.image.model_dump(mode="json"), "preprocess": settings.preprocess.model_dump(mode="json")}


def load_or_encode(
    labeler: Labeler, fetcher: ImageFetcher, settings: Settings, dataset: Dataset, cache: EmbeddingCache
) -> EncodeOutcome:
    started = time.perf_counter()
    key = cache_key(labeler.model.identity, dataset.fingerprint, pixel_settings(settings))
    cached = cache.load(key, len(dataset.samples))
    if cached is not None:
        EMBEDDING_CACHE_HITS.inc()
        log.info("eval_embeddings_cache_hit", images=len(dataset.samples), key=key)
        return EncodeOutcome(cached, True, 0, time.perf_counter() - started)
    encoded = encode_dataset(labeler, fetcher, settings, dataset)
    cache.store(key, encoded)
    log.info("eval_images_encoded", images=len(dataset.samples), failed=int((~encoded.ok).sum()), key=key)
    return EncodeOutcome(encoded, False, len(dataset.samples), time.perf_counter() - started)


def encode_dataset(labeler: Labeler, fetcher: ImageFetcher, settings: Settings, dataset: Dataset) -> EncodedDataset:
    locations = [s.location for s in dataset.samples]
    classifier = labeler.classifier_for(None)
    embeddings: list[np.ndarray | None] = [None] * len(locations)
    errors = [""] * len(locations)
    batch_size = settings.batch.max_size
    with ThreadPoolExecutor(settings.fetch.threads, thread_name_prefix="eval-prepare") as pool, tqdm(
        total=len(locations), desc="encode", unit="img", mininterval=0.5
    ) as bar:
        for batch in _prepared_batches(pool, labeler, fetcher, settings, locations, batch_size):
            _encode_batch(labeler, classifier, batch, embeddings, errors)
            bar.update(len(batch))
    return EncodedDataset(_stack(embeddings), tuple(errors))


Prepared = tuple[int, PreparedImage | LabelstreamError]


def _prepared_batches(
    pool: ThreadPoolExecutor, labeler: Labeler, fetcher: ImageFetcher, settings: Settings, locations: list[str], size: int
) -> Iterator[list[Prepared]]:
    """Batches of prepared images in dataset order, with later batches already being prepared."""
    pending: deque[tuple[int, Future[PreparedImage | LabelstreamError]]] = deque()
    next_index, batch = 0, []
    while next_index < len(locations) or pending:
        while next_index < len(locations) and len(pending) < size * _LOOKAHEAD_BATCHES:
            pending.append((next_index, pool.submit(_prepare, labeler, fetcher, settings, locations[next_index])))
            next_index += 1
        index, future = pending.popleft()
        batch.append((index, future.result()))
        if len(batch) == size or not pending:
            yield batch
            batch = []


def _prepare(labeler: Labeler, fetcher: ImageFetcher, settings: Settings, location: str) -> PreparedImage | LabelstreamError:
    try:
        return labeler.prepare_bytes(read_image_bytes(location, fetcher, settings.fetch.max_bytes))
    except LabelstreamError as exc:
        return exc


def _encode_batch(
    labeler: Labeler, classifier: ZeroShotClassifier, batch: list[Prepared], embeddings: list[np.ndarray | None], errors: list[str]
) -> None:
    good = [(i, p) for i, p in batch if isinstance(p, PreparedImage)]
    for index, failure in batch:
        if isinstance(failure, LabelstreamError):
            errors[index] = failure.code
            log.warning("eval_image_failed", index=index, code=failure.code, error=failure.message)
    if not good:
        return
    results = labeler.label([p.pixels for _, p in good], [classifier] * len(good))
    for (index, _), result in zip(good, results, strict=True):
        embeddings[index] = result.embedding
    IMAGES_ENCODED.inc(len(good))


def _stack(embeddings: list[np.ndarray | None]) -> np.ndarray:
    width = next((len(e) for e in embeddings if e is not None), 0)
    zero = np.zeros(width, dtype=np.float32)
    return np.stack([zero if e is None else e for e in embeddings]).astype(np.float32)


def score_embeddings(classifier: ZeroShotClassifier, embeddings: np.ndarray) -> np.ndarray:
    """[n_images, n_classes] scores, exactly as the worker's classifier computes them."""
    parts = [
        classifier.probabilities(torch.from_numpy(embeddings[i : i + _SCORE_CHUNK])).numpy()
        for i in range(0, len(embeddings), _SCORE_CHUNK)
    ]
    return np.concatenate(parts) if parts else np.zeros((0, len(classifier.taxonomy.classes)), dtype=np.float32)
