"""Argparse wiring for `labelstream eval` and `labelstream gallery` (heavy imports stay in the commands)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def add_commands(sub: argparse._SubParsersAction) -> None:
    _add_eval(sub)
    _add_gallery(sub)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("eval", help="measure a taxonomy on labelled images (metrics, thresholds, HTML report)")
    parser.add_argument("dataset", help="ImageFolder folder, s3://bucket/prefix/ (same layout), or a .csv/.jsonl manifest")
    parser.add_argument("--taxonomy", type=Path, help="taxonomy file (default: the built-in imagenet1k taxonomy)")
    parser.add_argument("--map", dest="label_map", type=Path, help="YAML/JSON mapping 'dataset class: taxonomy class'")
    parser.add_argument("--json", dest="json_out", type=Path, help="write every metric to this JSON file")
    parser.add_argument("--report", type=Path, help="write a self-contained HTML audit report")
    parser.add_argument("--compare", type=Path, help="another taxonomy to test against this one on the same embeddings")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--target-precision", type=_fraction, help="per class, the lowest threshold reaching this precision")
    target.add_argument("--target-recall", type=_fraction, help="per class, the highest threshold keeping this recall")
    parser.add_argument("--review-recall", type=_fraction, default=0.9,
                        help="the review band reaches down to the threshold keeping this recall (default 0.9)")
    parser.add_argument("--write-thresholds", type=Path, help="write a copy of the taxonomy with the chosen thresholds")
    parser.add_argument("--cache-dir", type=Path, help="image embedding cache (default ~/.cache/labelstream/eval-embeddings)")
    parser.add_argument("--no-cache", action="store_true", help="encode every image, and do not store the embeddings")
    parser.add_argument("--config", type=Path)


def _add_gallery(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("gallery", help="HTML gallery of recent label records on the stream (no ground truth)")
    parser.add_argument("--topic", help="labels topic (default: topics.labels)")
    parser.add_argument("--since", type=duration_seconds, default=3600.0, help="how far back, e.g. 30m, 1h, 2d (default 1h)")
    parser.add_argument("--report", type=Path, required=True, help="the HTML file to write")
    parser.add_argument("--max-records", type=int, default=10_000, help="stop after this many records")
    parser.add_argument("--per-label", type=int, default=6, help="sample images shown per label")
    parser.add_argument("--idle-timeout", type=float, default=3.0, help="stop after this many seconds without a new record")
    parser.add_argument("--config", type=Path)


def duration_seconds(text: str) -> float:
    match = _DURATION.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: use a number and a unit, such as 90s, 30m, 1h or 2d")
    return float(match.group(1)) * _SECONDS[match.group(2)]


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text}: must be in (0, 1]")
    return value


def dispatch(args: argparse.Namespace) -> int:
    if args.command == "eval":
        return _run_eval(args)
    from labelstream.evaluation.gallery import GalleryOptions, run_gallery

    return run_gallery(GalleryOptions(
        topic=args.topic, since_s=args.since, report=args.report, max_records=args.max_records,
        per_label=args.per_label, idle_timeout_s=args.idle_timeout, config=args.config,
    ))


def _run_eval(args: argparse.Namespace) -> int:
    from labelstream.evaluation.calibration import Target
    from labelstream.evaluation.evaluate import EvalOptions, run_eval

    target = None
    if args.target_precision is not None:
        target = Target("precision", args.target_precision)
    elif args.target_recall is not None:
        target = Target("recall", args.target_recall)
    return run_eval(EvalOptions(
        dataset=args.dataset, taxonomy=args.taxonomy, label_map=args.label_map, json_out=args.json_out,
        report=args.report, compare=args.compare, target=target, review_recall=args.review_recall,
        write_thresholds=args.write_thresholds, cache_dir=args.cache_dir, no_cache=args.no_cache, config=args.config,
    ))
