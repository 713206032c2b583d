"""Content-hash deduplication: an exact duplicate image skips decoding and the model.

The key is the SHA-256 of the image bytes, so only byte-identical images
match (a re-encoded copy of the same photo does not). An entry holds the
image embedding, which does not depend on the taxonomy, and the labels
already computed for each taxonomy version. A duplicate asked for under a new
taxonomy version reuses the embedding and needs only the classifier's matrix
product, not the model.

Bounded by a number of entries (least recently used goes first); 0 entries
disables the cache. Thread-safe: the prepare pool looks up and the inference
thread stores.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

from pipeline import metrics

Labels = TypeVar("Labels")


def content_key(data: bytes) -> str:
    """The cache key of an image: the hex SHA-256 of its bytes."""
    return hashlib.sha256(data).hexdigest()


@dataclass
class CachedImage(Generic[Labels]):
    # Read-only: every hit hands out this same array.
    embedding: np.ndarray
    # Taxonomy version -> the labels computed for it.
    labels: dict[str, Labels] = field(default_factory=dict)


class DedupeCache(Generic[Labels]):
    def __init__(self, max_entries: int) -> None:
        if max_entries < 0:
            raise ValueError("max_entries must be >= 0")
        self.max_entries = max_entries
        self._entries: OrderedDict[str, CachedImage[Labels]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def lookup(self, key: str) -> CachedImage[Labels] | None:
        """The entry for `key` (now the most recently used), counting a hit or a miss."""
        if not self.enabled:
            return None
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            self._count(hit=entry is not None)
        return entry

    def labels_for(self, key: str, taxonomy_version: str) -> tuple[np.ndarray, Labels | None] | None:
        """(embedding, labels or None when this version was never computed), or None on a miss."""
        entry = self.lookup(key)
        if entry is None:
            return None
        with self._lock:
            return entry.embedding, entry.labels.get(taxonomy_version)

    def store(self, key: str, embedding: np.ndarray, taxonomy_version: str, labels: Labels) -> None:
        """Remember `labels` for this image and taxonomy version, evicting the least recently used."""
        if not self.enabled:
            return
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = CachedImage(_frozen_copy(embedding))
                self._entries[key] = entry
            entry.labels[taxonomy_version] = labels
            self._entries.move_to_end(key)
            self._evict_over_limit()
            metrics.DEDUPE_ENTRIES.set(len(self._entries))

    def hit_rate(self) -> float:
        """Hits over lookups so far; 0.0 before the first lookup."""
        with self._lock:
            lookups = self.hits + self.misses
            return self.hits / lookups if lookups else 0.0

    def _count(self, hit: bool) -> None:
        if hit:
            self.hits += 1
            metrics.DEDUPE_HITS.inc()
        else:
            self.misses += 1
            metrics.DEDUPE_MISSES.inc()

    def _evict_over_limit(self) -> None:
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


def _frozen_copy(embedding: np.ndarray) -> np.ndarray:
    copy = np.array(embedding, copy=True)
    copy.setflags(write=False)
    return copy
