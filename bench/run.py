"""`make bench`: one table, every comparison measured side by side in this run.

    python -m bench.run                 # everything (about 9-10 minutes on 2 cores)
    python -m bench.run --only dedupe   # one row (repeatable)
    python -m bench.run --quick         # a few images per row: a smoke test, not a measurement

Exit status 1 when a row misses its target by more than the noise measured in
this run, or could not run at all; see bench/README.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import ExitStack

from bench import http_latency, rows
from bench.table import Row, error_row, exit_code, render

ROWS: dict[str, Callable[[rows.Bench], list[Row]]] = {
    "e2e_vs_offline": rows.e2e_vs_offline,
    "pipelined_vs_naive": rows.pipelined_vs_naive,
    "fast_vs_exact_preprocess": rows.fast_vs_exact,
    "dedupe": rows.dedupe,
    "memory": rows.memory,
    "latency": rows.latency,
    "eval_prompt_iteration": rows.eval_prompt_iteration,
    "http_latency": http_latency.http_latency,
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet_libraries()
    names = args.only or list(ROWS)
    started = time.monotonic()
    with ExitStack() as stack:
        bench = rows.Bench(rows.QUICK if args.quick else rows.FULL, args.quick, stack)
        results = [row for name in names for row in _run_row(name, bench)]
    mode = "quick smoke run (numbers mean nothing)" if args.quick else "full run"
    print(f"\nlabelstream bench, {mode}, {os.cpu_count()} CPUs, {time.monotonic() - started:.0f} s\n")
    print(render(results))
    print(f"\n{_legend()}")
    return exit_code(results)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few images per row (smoke test)")
    parser.add_argument("--only", action="append", choices=list(ROWS), help="run only this row (repeatable)")
    return parser


def _run_row(name: str, bench: rows.Bench) -> list[Row]:
    print(f"[bench] {name} ...", file=sys.stderr, flush=True)
    started = time.monotonic()
    try:
        result = ROWS[name](bench)
    except Exception as exc:  # noqa: BLE001 - one broken row must not hide the others
        traceback.print_exc()
        result = [error_row(name, exc)]
    print(f"[bench] {name} done in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return result


def _quiet_libraries() -> None:
    # kafka-python's connection chatter and open_clip's random-init notice would bury the table.
    logging.basicConfig(level=logging.ERROR)
    for name in ("kafka", "root"):
        logging.getLogger(name if name != "root" else None).setLevel(logging.ERROR)
    from labelstream.logs import configure_logging
    from pipeline.config import LogSettings

    configure_logging(LogSettings(level="WARNING", format="console"))


def _legend() -> str:
    return ("PASS meets the target; NOISE misses it by less than the noise measured in this run; FAIL misses it "
            "by more (exit 1).\nnoise: the relative standard error of each side, from repeating its measurement "
            "(the worker: four consecutive slices of its timed run; the others: whole repeated runs), the sides "
            "combined in quadrature.")


if __name__ == "__main__":
    sys.exit(main())
