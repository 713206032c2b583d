"""The `labelstream` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.errors import LabelstreamError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="labelstream", description="Streaming zero-shot image labeling.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the worker until SIGTERM/SIGINT")
    run.add_argument("--config", type=Path, help="YAML config file (environment variables override it)")
    run.add_argument("--http", action="store_true", help="also serve the HTTP API (http.port), sharing the model")

    serve = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API (no Kafka) until SIGTERM/SIGINT")
    serve.add_argument("--config", type=Path, help="YAML config file (environment variables override it)")

    submit = sub.add_parser("submit", help="produce requests for local files or S3 keys/prefixes")
    submit.add_argument("sources", nargs="+", help="local paths (with --bucket) or s3://bucket/key-or-prefix")
    submit.add_argument("--bucket", help="upload local files to this bucket first")
    submit.add_argument("--prefix", default="", help="key prefix for uploaded files")
    submit.add_argument("--taxonomy", help="taxonomy name to put in each request")
    submit.add_argument("--config", type=Path)

    classify = sub.add_parser("classify", help="label images offline, without Kafka")
    classify.add_argument("images", nargs="+", help="local paths or s3://bucket/key")
    classify.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    classify.add_argument("--taxonomy", type=Path, help="taxonomy file (default: the configured one)")
    classify.add_argument("--config", type=Path)

    demo = sub.add_parser("demo", help="run the whole pipeline on an embedded broker and S3 server")
    demo.add_argument("--images", type=int, default=12, help="how many sample photos to label")

    sub.add_parser("schema", help="print the JSON Schema of every message type")
    top = sub.add_parser("top", help="live view of a running worker's metrics endpoint")
    top.add_argument("--url", default="http://127.0.0.1:9400", help="the worker's metrics server (metrics.port)")
    top.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    top.add_argument("--once", action="store_true", help="print one frame (two scrapes, --interval apart) and exit")
    _add_taxonomy_commands(sub)
    _add_backfill_command(sub)
    from labelstream.evaluation.cli import add_commands as add_evaluation_commands

    add_evaluation_commands(sub)
    return parser


def _add_taxonomy_commands(sub: argparse._SubParsersAction) -> None:
    taxonomy = sub.add_parser("taxonomy", help="validate, inspect and publish taxonomies")
    actions = taxonomy.add_subparsers(dest="taxonomy_command", required=True)
    validate = actions.add_parser("validate", help="check taxonomy files; errors name file, field and line")
    validate.add_argument("files", nargs="+", type=Path)
    show = actions.add_parser("show", help="classes, prompt count, version and cache state of a configured taxonomy")
    show.add_argument("name")
    show.add_argument("--json", action="store_true", help="print JSON instead of text")
    show.add_argument("--config", type=Path)
    publish = actions.add_parser("publish", help="validate a taxonomy file and write it to the taxonomies topic")
    publish.add_argument("file", type=Path)
    publish.add_argument("--config", type=Path)


def _add_backfill_command(sub: argparse._SubParsersAction) -> None:
    backfill = sub.add_parser(
        "backfill",
        help="produce a request for every image object under an S3 prefix; resumable",
        description="List s3://bucket/prefix/ page by page and produce one request per image object: keys whose "
        "extension Pillow maps to one of image.allowed_formats (by default .jpg .jpeg .jpe .jfif .png .apng .webp "
        ".gif .bmp .tif .tiff, any case); other keys are not requested. Objects whose labelstream marker tag "
        "says they were labelled with this taxonomy version are skipped. The position is saved after every "
        "acknowledged chunk; run the same command again to resume. A run that completed starts a new pass.",
    )
    backfill.add_argument("uri", help="s3://bucket/ or s3://bucket/prefix/")
    backfill.add_argument("--taxonomy", help="taxonomy name for the requests and the skip check (default: the configured default)")
    backfill.add_argument("--since", type=_since, help="only objects modified at or after this date/ISO time (UTC unless it says)")
    backfill.add_argument("--force", action="store_true", help="request every image object, labelled or not (no tag reads)")
    # No default here: backfill.DEFAULT_RATE is the one value (importing it would slow every command).
    backfill.add_argument("--rate", type=float, help="at most this many requests per second (0: no limit; default 200)")
    backfill.add_argument(
        "--state", type=Path,
        help="state file (default: $XDG_CACHE_HOME or ~/.cache, then labelstream/backfill/BUCKET-HASH.json)",
    )
    backfill.add_argument("--config", type=Path)


def _since(text: str) -> object:
    from labelstream.backfill import parse_since

    try:
        return parse_since(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except LabelstreamError as exc:
        print(f"labelstream {args.command}: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "run":
        from labelstream.worker_main import run_worker

        return run_worker(args.config, http=args.http)
    if args.command == "serve":
        from labelstream.serve import run_serve

        return run_serve(args.config)
    if args.command == "submit":
        from labelstream.submit import submit

        return submit(args.sources, args.bucket, args.prefix, args.taxonomy, args.config)
    if args.command == "backfill":
        from labelstream.backfill import DEFAULT_RATE, BackfillOptions, backfill

        rate = DEFAULT_RATE if args.rate is None else args.rate
        return backfill(BackfillOptions(args.uri, args.taxonomy, args.since, args.force, rate, args.state, args.config))
    if args.command == "classify":
        from labelstream.classify import classify

        return classify(args.images, args.json, args.taxonomy, args.config)
    if args.command == "demo":
        from labelstream.demo import run_demo

        return run_demo(args.images)
    if args.command == "taxonomy":
        return _dispatch_taxonomy(args)
    if args.command in ("eval", "gallery"):
        from labelstream.evaluation.cli import dispatch as dispatch_evaluation

        return dispatch_evaluation(args)
    if args.command == "top":
        from labelstream.top import run_top

        return run_top(args.url, args.interval, args.once)
    from labelstream.schema_dump import print_schemas

    return print_schemas()


def _dispatch_taxonomy(args: argparse.Namespace) -> int:
    from labelstream import taxonomy_cli

    if args.taxonomy_command == "validate":
        return taxonomy_cli.validate(args.files)
    if args.taxonomy_command == "show":
        return taxonomy_cli.show(args.name, args.json, args.config)
    return taxonomy_cli.publish(args.file, args.config)


if __name__ == "__main__":
    sys.exit(main())
