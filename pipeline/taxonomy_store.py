"""Which taxonomies a worker serves: `taxonomy.path`, `taxonomy.files` and every file in `taxonomy.dir`.

With none configured the worker serves the built-in ImageNet-1k taxonomy, as
it always has. `taxonomy.default` may also name that built-in alongside files.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import TaxonomySettings
from pipeline.errors import ConfigError, TaxonomyError
from pipeline.taxonomy import BUILTIN_IMAGENET, Taxonomy, imagenet_taxonomy, load_taxonomy

TAXONOMY_SUFFIXES = (".yaml", ".yml", ".json")


def configured_files(settings: TaxonomySettings) -> list[Path]:
    """Every taxonomy file the settings name, `path` first, each once."""
    candidates = ([settings.path] if settings.path else []) + list(settings.files)
    if settings.dir is not None:
        candidates += directory_files(settings.dir)
    unique: dict[Path, Path] = {}
    for path in candidates:
        unique.setdefault(Path(path).resolve(), Path(path))
    return list(unique.values())


def directory_files(directory: Path) -> list[Path]:
    if not Path(directory).is_dir():
        raise ConfigError(f"taxonomy.dir {directory}: not a directory")
    # Editors' swap and backup files start with a dot; they are not taxonomies.
    return sorted(
        p for p in Path(directory).iterdir()
        if p.suffix.lower() in TAXONOMY_SUFFIXES and p.is_file() and not p.name.startswith(".")
    )


def load_configured(settings: TaxonomySettings) -> list[Taxonomy]:
    """Parse every configured taxonomy; any invalid file stops start-up with its file, field and line."""
    files = configured_files(settings)
    taxonomies = [load_taxonomy(path) for path in files]
    _require_unique_names(taxonomies, files)
    if not taxonomies or (settings.default == BUILTIN_IMAGENET and BUILTIN_IMAGENET not in _names(taxonomies)):
        taxonomies.append(imagenet_taxonomy())
    return taxonomies


def default_name(settings: TaxonomySettings, taxonomies: list[Taxonomy]) -> str:
    if settings.default is None:
        return taxonomies[0].name
    if settings.default not in _names(taxonomies):
        raise ConfigError(f"taxonomy.default {settings.default!r} is not among the loaded taxonomies {_names(taxonomies)}")
    return settings.default


def find_configured(settings: TaxonomySettings, name: str) -> Taxonomy:
    """One configured taxonomy by name (the built-in ImageNet one is always findable)."""
    if name == BUILTIN_IMAGENET:
        return imagenet_taxonomy()
    taxonomies = [load_taxonomy(path) for path in configured_files(settings)]
    for taxonomy in taxonomies:
        if taxonomy.name == name:
            return taxonomy
    known = _names(taxonomies) + [BUILTIN_IMAGENET]
    raise TaxonomyError(f"no configured taxonomy is named {name!r}; known: {known}", code="taxonomy.unknown")


def _names(taxonomies: list[Taxonomy]) -> list[str]:
    return [t.name for t in taxonomies]


def _require_unique_names(taxonomies: list[Taxonomy], files: list[Path]) -> None:
    first_file: dict[str, Path] = {}
    for taxonomy, path in zip(taxonomies, files, strict=True):
        if taxonomy.name in first_file:
            raise TaxonomyError(
                f"taxonomy file {path}: field 'name': {taxonomy.name!r} is already defined by {first_file[taxonomy.name]}"
            )
        first_file[taxonomy.name] = path
