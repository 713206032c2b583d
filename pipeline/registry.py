"""The classifiers a worker can score against, looked up by taxonomy name."""

from __future__ import annotations

from pipeline.classifier import ZeroShotClassifier
from pipeline.errors import TaxonomyError


class ClassifierRegistry:
    def __init__(self, classifiers: list[ZeroShotClassifier], default: str | None = None) -> None:
        if not classifiers:
            raise TaxonomyError("no taxonomy is loaded")
        self._by_name = {c.taxonomy.name: c for c in classifiers}
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

    def names(self) -> list[str]:
        return sorted(self._by_name)
