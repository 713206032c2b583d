"""API keys: `Authorization: Bearer <key>`, compared in constant time against SHA-256 digests.

Keys come from `http.api_keys` (SecretStr, hashed at start-up) and/or
`http.api_key_hashes_file` (one SHA-256 hex digest per line; `#` comments and
blank lines are skipped), so plain keys never need to sit in config. Only a
digest prefix ever identifies a key (rate limiting, logs); the key itself is
never stored or logged.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import HttpSettings
from pipeline.errors import ConfigError

_HEX_DIGEST = re.compile(r"^[0-9a-fA-F]{64}$")


@dataclass(frozen=True)
class KeyStore:
    digests: tuple[bytes, ...]

    @classmethod
    def from_settings(cls, settings: HttpSettings) -> KeyStore:
        digests = [hashlib.sha256(key.get_secret_value().encode()).digest() for key in settings.api_keys]
        if settings.api_key_hashes_file is not None:
            digests += read_hashes_file(settings.api_key_hashes_file)
        return cls(tuple(digests))

    def identify(self, presented: str) -> str | None:
        """A stable, log-safe id of the matching key (a digest prefix), or None.

        Every stored digest is compared, so the time taken does not say which
        key, or how much of one, matched.
        """
        digest = hashlib.sha256(presented.encode()).digest()
        matched = None
        for stored in self.digests:
            if hmac.compare_digest(digest, stored):
                matched = stored
        return None if matched is None else matched.hex()[:12]


def read_hashes_file(path: Path) -> list[bytes]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"http.api_key_hashes_file {path}: cannot read: {exc}") from exc
    digests = []
    for number, line in enumerate(lines, start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        if not _HEX_DIGEST.match(text):
            raise ConfigError(f"http.api_key_hashes_file {path}: line {number} is not a SHA-256 hex digest")
        digests.append(bytes.fromhex(text))
    return digests


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None
