"""Where `labelstream backfill` is in its listing, kept on disk between runs.

One small JSON file per backfill, identified by bucket, prefix, taxonomy name,
taxonomy version and `--since`. `position` is the last key that is done: every
key up to and including it (in S3's listing order) was either acknowledged by
the broker or deliberately not requested. A run resumes with `StartAfter=position`.

The file is replaced atomically (write a temporary file, fsync, rename), so a
crash at any moment leaves either the old position or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from pipeline.errors import ConfigError

_FORMAT = 1


@dataclass(frozen=True)
class BackfillKey:
    """What makes two backfill runs the same backfill."""

    bucket: str
    prefix: str
    taxonomy: str
    taxonomy_version: str
    since: str | None

    def digest(self) -> str:
        canonical = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class BackfillState:
    key: BackfillKey
    position: str | None = None
    listed: int = 0
    requested: int = 0
    skipped: int = 0
    ignored: int = 0
    completed: bool = False
    updated_at: str = ""

    def advanced(self, position: str | None, listed: int, requested: int, skipped: int, ignored: int) -> BackfillState:
        """This state with `position` moved on and the counts added."""
        return replace(
            self,
            position=position if position is not None else self.position,
            listed=self.listed + listed,
            requested=self.requested + requested,
            skipped=self.skipped + skipped,
            ignored=self.ignored + ignored,
        )


def default_state_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "labelstream" / "backfill"


def default_state_path(key: BackfillKey) -> Path:
    return default_state_dir() / f"{key.bucket}-{key.digest()}.json"


def load_state(path: Path, key: BackfillKey) -> BackfillState:
    """The saved state of this backfill; a fresh one when there is none or the last run completed.

    A completed run starts over from the first key: a rerun is a new pass
    (objects labelled since are skipped by their tags, unless --force).
    """
    if not path.exists():
        return BackfillState(key=key)
    saved = _read(path)
    if saved.key != key:
        raise ConfigError(
            f"state file {path} belongs to another backfill ({_describe(saved.key)}), not {_describe(key)}; "
            "pass a different --state or delete the file"
        )
    return BackfillState(key=key) if saved.completed else saved


def save_state(path: Path, state: BackfillState) -> None:
    stamped = replace(state, updated_at=datetime.now(UTC).isoformat(timespec="seconds"))
    document = {"format": _FORMAT, **asdict(stamped)}
    try:
        _write_atomically(path, json.dumps(document, indent=1, sort_keys=True))
    except OSError as exc:
        raise ConfigError(f"state file {path}: cannot write it ({exc}); pass a writable --state") from exc


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _read(path: Path) -> BackfillState:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        if document.pop("format", None) != _FORMAT:
            raise ValueError(f"unknown format, expected {_FORMAT}")
        return BackfillState(**{**document, "key": BackfillKey(**document["key"])})
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"state file {path}: unreadable ({exc}); delete it to start over") from exc


def _describe(key: BackfillKey) -> str:
    since = f", since {key.since}" if key.since else ""
    return f"s3://{key.bucket}/{key.prefix}, taxonomy {key.taxonomy} version {key.taxonomy_version}{since}"
