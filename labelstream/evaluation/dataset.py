"""Labelled datasets for `labelstream eval`, and how their classes map to a taxonomy.

A DATASET argument is one of:
- a folder in ImageFolder layout: one subfolder per class, images anywhere below it;
- `s3://bucket/prefix/` in the same layout (the first key component after the prefix is the class);
- a CSV manifest with a header: an `image` (or `path`, `uri`) column and a `labels` column
  (several labels separated by `;`) or a `label` column;
- a JSONL manifest: one `{"image": ..., "labels": [...]}` (or `"label": "..."`) per line.
Manifest images are local paths (relative to the manifest) or s3:// URIs.

Dataset class names map to taxonomy classes by name, through `--map FILE` (a
YAML/JSON mapping `dataset class: taxonomy class`), or, for ImageNet's
synset folders (n01440764, ...), through the shipped
`data/imagenet_synsets.json` to the built-in imagenet1k class names.

The fingerprint (part of the embedding cache key) hashes every image's
location, labels and, for local files, size and modification time; for S3
prefixes, each object's ETag and size. S3 URIs inside manifests are hashed by
URI only: overwrite such an object and you must pass `--no-cache` once.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from labelstream.sources import is_s3_uri, parse_s3_uri
from pipeline.errors import ConfigError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
_IMAGE_COLUMNS = ("image", "path", "uri")
_SYNSET = re.compile(r"^n\d{8}$")
_SYNSETS_FILE = Path(__file__).parent / "data" / "imagenet_synsets.json"


@dataclass(frozen=True)
class Sample:
    # A local path or an s3://bucket/key URI.
    location: str
    # The dataset's own class names.
    labels: tuple[str, ...]


@dataclass(frozen=True)
class Dataset:
    source: str
    samples: tuple[Sample, ...]
    fingerprint: str

    @property
    def is_multi_label(self) -> bool:
        return any(len(s.labels) != 1 for s in self.samples)

    @property
    def classes(self) -> list[str]:
        return sorted({label for s in self.samples for label in s.labels})


def load_dataset(spec: str, s3_client: Any = None) -> Dataset:
    """Read any supported DATASET argument; `s3_client` is needed for s3:// prefixes only."""
    if is_s3_uri(spec):
        return _s3_folder(s3_client, *parse_s3_uri(spec), spec)
    path = Path(spec)
    if path.is_dir():
        return _image_folder(path)
    if path.suffix.lower() == ".csv":
        return _manifest(path, _csv_rows(path))
    if path.suffix.lower() in {".jsonl", ".ndjson"}:
        return _manifest(path, _jsonl_rows(path))
    raise ConfigError(f"dataset {spec}: not a folder, s3:// prefix, .csv or .jsonl manifest", code="eval.bad_dataset")


def _image_folder(root: Path) -> Dataset:
    samples, parts = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for image in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
            samples.append(Sample(str(image), (folder.name,)))
            stat = image.stat()
            parts.append(f"{image.relative_to(root).as_posix()}|{folder.name}|{stat.st_size}|{stat.st_mtime_ns}")
    return _finish(str(root), samples, parts)


def _s3_folder(client: Any, bucket: str, prefix: str, spec: str) -> Dataset:
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    samples, parts = [], []
    for obj in _list_objects(client, bucket, prefix):
        relative = obj["Key"][len(prefix):]
        if "/" not in relative or Path(relative).suffix.lower() not in IMAGE_SUFFIXES:
            continue  # not inside a class folder, or not an image
        label = relative.split("/", 1)[0]
        samples.append(Sample(f"s3://{bucket}/{obj['Key']}", (label,)))
        parts.append(f"{obj['Key']}|{label}|{obj.get('ETag', '')}|{obj.get('Size', 0)}")
    return _finish(spec, samples, parts)


def _list_objects(client: Any, bucket: str, prefix: str) -> Iterable[dict[str, Any]]:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        yield from page.get("Contents", [])


def _csv_rows(path: Path) -> list[dict[str, Any]]:
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return [_row_labels(row, path, number) for number, row in enumerate(rows, start=2)]


def _jsonl_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(_row_labels(json.loads(line), path, number))
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path} line {number}: not JSON: {exc}", code="eval.bad_dataset") from exc
    return rows


def _row_labels(row: dict[str, Any], path: Path, number: int) -> dict[str, Any]:
    """Normalise one manifest row to {image, labels}; errors name the file and line."""
    image = next((row[c] for c in _IMAGE_COLUMNS if row.get(c)), None)
    labels = row.get("labels", row.get("label"))
    if isinstance(labels, str):
        labels = [part.strip() for part in labels.split(";") if part.strip()]
    if not image or not isinstance(labels, list):
        raise ConfigError(f"{path} line {number}: needs an image/path/uri and a label/labels field", code="eval.bad_dataset")
    return {"image": str(image), "labels": tuple(str(label) for label in labels)}


def _manifest(path: Path, rows: list[dict[str, Any]]) -> Dataset:
    samples, parts = [], []
    for row in rows:
        location = row["image"] if is_s3_uri(row["image"]) else str((path.parent / row["image"]).resolve())
        samples.append(Sample(location, row["labels"]))
        parts.append(f"{location}|{';'.join(row['labels'])}|{_local_stat(location)}")
    return _finish(str(path), samples, parts)


def _local_stat(location: str) -> str:
    if is_s3_uri(location):
        return ""
    try:
        stat = Path(location).stat()
    except OSError:
        return "missing"
    return f"{stat.st_size}|{stat.st_mtime_ns}"


def _finish(source: str, samples: list[Sample], parts: list[str]) -> Dataset:
    if not samples:
        raise ConfigError(f"dataset {source}: no labelled images found", code="eval.empty_dataset")
    fingerprint = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]
    return Dataset(source, tuple(samples), fingerprint)


def load_label_map(path: Path) -> dict[str, str]:
    """`--map FILE`: a YAML or JSON mapping from dataset class to taxonomy class."""
    try:
        document = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"--map {path}: {exc}", code="eval.bad_map") from exc
    if not isinstance(document, dict):
        raise ConfigError(f"--map {path}: must be a mapping 'dataset class: taxonomy class'", code="eval.bad_map")
    return {str(k): str(v) for k, v in document.items()}


@cache
def imagenet_synsets() -> dict[str, str]:
    """wnid (n01440764) -> the built-in imagenet1k taxonomy's class name, in ILSVRC class order."""
    return json.loads(_SYNSETS_FILE.read_text(encoding="utf-8"))["synsets"]


def class_mapping(dataset_classes: list[str], taxonomy_classes: list[str], explicit: dict[str, str]) -> dict[str, str]:
    """dataset class -> taxonomy class; a dataset class without one is an error naming it."""
    known = set(taxonomy_classes)
    synsets = imagenet_synsets()
    mapping, missing = {}, []
    for name in dataset_classes:
        target = explicit.get(name) or (name if name in known else None)
        if target is None and _SYNSET.match(name):
            target = synsets.get(name)
        if target not in known:
            missing.append(name)
        else:
            mapping[name] = target
    if missing:
        raise ConfigError(
            f"dataset classes with no taxonomy class: {missing}; rename them, add them to the taxonomy or map them with --map",
            code="eval.unmapped_class",
        )
    return mapping


def classes_without_images(mapping: dict[str, str], taxonomy_classes: list[str]) -> list[str]:
    used = set(mapping.values())
    return [name for name in taxonomy_classes if name not in used]


def truth_matrix(dataset: Dataset, mapping: dict[str, str], taxonomy_classes: list[str]) -> np.ndarray:
    """Boolean [n_images, n_classes]: which taxonomy classes each image truly belongs to."""
    index = {name: i for i, name in enumerate(taxonomy_classes)}
    truth = np.zeros((len(dataset.samples), len(taxonomy_classes)), dtype=bool)
    for row, sample in enumerate(dataset.samples):
        for label in sample.labels:
            truth[row, index[mapping[label]]] = True
    return truth
