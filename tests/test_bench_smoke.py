"""`make bench` is not part of `make test`; this small run only checks that it produces its table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.run import ROWS
from bench.table import HEADER

REPO_ROOT = Path(__file__).resolve().parent.parent
# Issue 5's rows plus issue 7's prompt-iteration row; a row dropped from ROWS must fail here, not vanish.
EXPECTED_ROWS = (
    "e2e_vs_offline", "pipelined_vs_naive", "fast_vs_exact_preprocess", "dedupe", "memory", "latency",
    "eval_prompt_iteration", "http_latency",
)


def test_quick_bench_prints_one_table_with_every_row() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick"], capture_output=True, text=True, timeout=240, cwd=REPO_ROOT,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    lines = done.stdout.splitlines()
    header = [line for line in lines if line.split()[: len(HEADER)] == list(HEADER)]
    assert len(header) == 1, done.stdout
    assert set(EXPECTED_ROWS) <= set(ROWS)
    for name in ROWS:
        assert any(line.startswith(name) for line in lines), f"row {name} missing:\n{done.stdout}"
    assert not [line for line in lines if line.rstrip().endswith("ERROR")], done.stdout
