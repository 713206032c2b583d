"""Hot reload: taxonomy edits go live without a restart and without a pause in consuming.

Two feeds reach one `TaxonomyReloader`: a watcher thread that polls the
configured files, and `apply_document` (the taxonomies topic). Either way the
new document is parsed, validated and its classifier built (or loaded from
the cache) off the poll thread, then swapped into the registry in one step.
A document that fails is logged as `taxonomy_rejected` with its file, field
and line, and the version already live keeps serving.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from pipeline import metrics
from pipeline.classifier_cache import ClassifierCache, load_or_build
from pipeline.config import TaxonomySettings
from pipeline.errors import LabelstreamError, TaxonomyError
from pipeline.model import LoadedModel
from pipeline.registry import ClassifierRegistry
from pipeline.taxonomy import Taxonomy, parse_taxonomy
from pipeline.taxonomy_store import configured_files

log = structlog.get_logger("labelstream.taxonomy")


@dataclass
class _WatchedFile:
    # Digest of the content last acted on (loaded or rejected), and the name it defined.
    applied: str | None = None
    name: str | None = None
    # Digest seen on the previous poll but not yet acted on; see `_settled`.
    pending: str | None = None


class TaxonomyReloader:
    def __init__(
        self,
        model: LoadedModel,
        registry: ClassifierRegistry,
        cache: ClassifierCache,
        settings: TaxonomySettings,
        admit: Callable[[Taxonomy], None] | None = None,
    ) -> None:
        self.model = model
        # Checks a new version against the world outside the file before it goes live
        # (its route topics exist); raises LabelstreamError to reject it.
        self.admit = admit
        self.registry = registry
        self.cache = cache
        self.settings = settings
        self._files: dict[Path, _WatchedFile] = {}
        # Which file (or "kafka") the live version of each name came from.
        self._origins: dict[str, str] = {}
        # One update at a time, so the watcher and the topic never race on a name.
        self._update_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Note what is live now, then watch the files in a background thread (unless the interval is 0)."""
        self.poll_once(settle=False)
        if self.settings.watch_interval_s > 0:
            self._thread = threading.Thread(target=self._watch, name="taxonomy-watch", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)

    def _watch(self) -> None:
        while not self._stop.wait(self.settings.watch_interval_s):
            try:
                self.poll_once()
            except Exception as exc:  # noqa: BLE001 - the watcher must outlive any one bad poll
                log.error("taxonomy_watch_failed", error=f"{type(exc).__name__}: {exc}")

    # -- files -----------------------------------------------------------------

    def poll_once(self, settle: bool = True) -> None:
        """Apply every file whose content changed, and drop taxonomies whose file is gone.

        With `settle`, a change is applied only once the same content is seen
        on two polls in a row, so a file caught half-written is not loaded.
        """
        present = self._present_files()
        for path, data in present.items():
            if data is not None:
                self._check_file(path, data, settle)
        for path in [p for p in self._files if p not in present]:
            self._file_gone(path)

    def _present_files(self) -> dict[Path, bytes | None]:
        """Content of every configured file that exists; None for one that exists but cannot be read now."""
        try:
            paths = configured_files(self.settings)
        except LabelstreamError as exc:
            # A vanished or unreadable dir is more likely an outage than an intent to drop everything.
            log.warning("taxonomy_dir_unreadable", error=exc.message)
            return dict.fromkeys(self._files)
        present: dict[Path, bytes | None] = {}
        for path in paths:
            try:
                present[path] = path.read_bytes()
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("taxonomy_file_unreadable", file=str(path), error=str(exc))
                present[path] = None
        return present

    def _check_file(self, path: Path, data: bytes, settle: bool) -> None:
        watched = self._files.setdefault(path, _WatchedFile())
        digest = hashlib.sha256(data).hexdigest()
        if digest == watched.applied or (settle and not _settled(watched, digest)):
            return
        watched.applied, watched.pending = digest, None
        with self._update_lock:
            self._apply_file(path, data, watched)

    def _apply_file(self, path: Path, data: bytes, watched: _WatchedFile) -> None:
        origin = str(path)
        try:
            taxonomy = parse_taxonomy(_decode(data, origin), source=origin)
            self._refuse_name_clash(taxonomy, origin)
        except TaxonomyError as exc:
            self._reject(exc, origin, kind="file")
            return
        if self._install(taxonomy, origin, kind="file") and watched.name not in (None, taxonomy.name):
            # The file now defines another name: the old one no longer has a source.
            self._remove(watched.name, origin, kind="file")
        watched.name = taxonomy.name

    def _file_gone(self, path: Path) -> None:
        watched = self._files.pop(path)
        if watched.name is not None:
            with self._update_lock:
                self._remove(watched.name, str(path), kind="file")

    def _refuse_name_clash(self, taxonomy: Taxonomy, origin: str) -> None:
        owner = self._origins.get(taxonomy.name)
        if owner is not None and owner != origin and owner != "kafka" and Path(owner) in self._files:
            raise TaxonomyError(
                f"taxonomy file {origin}: field 'name': {taxonomy.name!r} is already defined by {owner}"
            )

    # -- the taxonomies topic ------------------------------------------------

    def apply_document(self, name: str, text: str, source: str = "kafka") -> bool:
        """Validate and install one document from the taxonomies topic; False if it was rejected."""
        with self._update_lock:
            try:
                taxonomy = parse_taxonomy(text, source=source)
                _require_key_matches(taxonomy, name, source)
            except TaxonomyError as exc:
                self._reject(exc, source, kind="kafka", taxonomy=name)
                return False
            return self._install(taxonomy, "kafka", kind="kafka")

    def remove_document(self, name: str) -> bool:
        """A tombstone on the topic: stop serving `name` (never the default)."""
        with self._update_lock:
            return self._remove(name, None, kind="kafka")

    # -- the registry ----------------------------------------------------------

    def _install(self, taxonomy: Taxonomy, origin: str, kind: str) -> bool:
        live = self.registry.find(taxonomy.name)
        version = taxonomy.version(self.model.identity)
        if live is not None and live.version == version:
            self._origins.setdefault(taxonomy.name, origin)
            metrics.TAXONOMY_UPDATES.labels(origin=kind, outcome="unchanged").inc()
            return True
        try:
            if self.admit is not None:
                self.admit(taxonomy)
        except LabelstreamError as exc:
            self._reject(exc, origin, kind, taxonomy.name)
            return False
        try:
            classifier = load_or_build(self.model, taxonomy, self.cache)
        except Exception as exc:  # noqa: BLE001 - a failed build must not take the old version down
            self._reject(TaxonomyError(f"{origin}: building the classifier failed: {exc}"), origin, kind)
            return False
        self.registry.swap(classifier)
        self._origins[taxonomy.name] = origin
        metrics.TAXONOMY_UPDATES.labels(origin=kind, outcome="loaded").inc()
        log.info("taxonomy_loaded", taxonomy=taxonomy.name, version=classifier.version, mode=taxonomy.mode,
                 classes=len(taxonomy.classes), previous_version=live.version if live else None, origin=origin)
        return True

    def _remove(self, name: str, origin: str | None, kind: str) -> bool:
        if origin is not None and self._origins.get(name) != origin:
            return False  # another source has since taken the name over
        try:
            removed = self.registry.remove(name)
        except TaxonomyError as exc:
            log.warning("taxonomy_remove_refused", taxonomy=name, origin=origin or kind, error=exc.message)
            return False
        self._origins.pop(name, None)
        if removed:
            metrics.TAXONOMY_UPDATES.labels(origin=kind, outcome="removed").inc()
            log.info("taxonomy_removed", taxonomy=name, origin=origin or kind)
        return removed

    def _reject(self, exc: LabelstreamError, origin: str, kind: str, taxonomy: str | None = None) -> None:
        metrics.TAXONOMY_UPDATES.labels(origin=kind, outcome="rejected").inc()
        log.error("taxonomy_rejected", file=origin, taxonomy=taxonomy, error=exc.message, code=exc.code,
                  live_versions=self.registry.versions())


def _settled(watched: _WatchedFile, digest: str) -> bool:
    if watched.pending == digest:
        return True
    watched.pending = digest
    return False


def _decode(data: bytes, origin: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TaxonomyError(f"taxonomy file {origin}: not UTF-8 text: {exc}") from exc


def _require_key_matches(taxonomy: Taxonomy, key: str, source: str) -> None:
    if taxonomy.name != key:
        raise TaxonomyError(f"taxonomy file {source}: field 'name': {taxonomy.name!r} does not match the record key {key!r}")
