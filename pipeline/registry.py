"""The classifiers a worker can score against, looked up by taxonomy name.

The registry is live: hot reload replaces or removes one taxonomy's
classifier while the worker runs. Writers build a new dict and swap the
reference under a lock; readers take the current dict without locking, so a
lookup always sees one whole version of the map, and the worker, which looks
a classifier up once per request at admission, never mixes two versions of a
taxonomy inside one record.
"""

from __future__ import annotations

import threading

from pipeline.classifier import ZeroShotClassifier
from pipeline.errors import TaxonomyError


class ClassifierRegistry:
    def __init__(self, classifiers: list[ZeroShotClassifier], default: str | None = None) -> None:
        if not classifiers:
            raise TaxonomyError("no taxonomy is loaded")
        self._by_name = {c.taxonomy.name: c for c in classifiers}
        self._lock = threading.Lock()
        self.default = default or classifiers[0].taxonomy.name
        if self.default not in self._by_name:
            raise TaxonomyError(f"default taxonomy {self.default!r} is not among {sorted(self._by_name)}")

    def get(self, name: str | None) -> ZeroShotClassifier:
        classifier = self._by_name.get(name or self.default)
        if classifier is None:
            raise TaxonomyError(
                f"unknown taxonomy {name!r}; this worker has {sorted(self._by_name)}",
                code="taxonomy.unknown",
                stage="validate",
            )
        return classifier

    def find(self, name: str) -> ZeroShotClassifier | None:
        return self._by_name.get(name)

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def versions(self) -> dict[str, str]:
        return {name: c.version for name, c in sorted(self._by_name.items())}

    def swap(self, classifier: ZeroShotClassifier) -> ZeroShotClassifier | None:
        """Make `classifier` the live one for its taxonomy; returns the one it replaced."""
        with self._lock:
            updated = dict(self._by_name)
            previous = updated.get(classifier.taxonomy.name)
            updated[classifier.taxonomy.name] = classifier
            self._by_name = updated
        return previous

    def remove(self, name: str) -> bool:
        """Stop serving `name`; the default cannot be removed. Returns whether it was live."""
        if name == self.default:
            raise TaxonomyError(f"taxonomy {name!r} is the default and cannot be removed", code="taxonomy.default")
        with self._lock:
            if name not in self._by_name:
                return False
            self._by_name = {n: c for n, c in self._by_name.items() if n != name}
        return True
