"""One row per comparison, and the single table `make bench` prints.

Verdicts: a ratio is compared with its target allowing for the noise measured
in the same run. PASS meets the target outright; NOISE misses it by less than
the noise (not counted as a failure); FAIL misses it by more (the bench exits
non-zero); INFO rows have no target; ERROR means the row could not run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

Verdict = Literal["PASS", "NOISE", "FAIL", "INFO", "ERROR", "QUICK"]
HEADER = ("row", "measured", "baseline", "ratio", "target", "noise", "result")


@dataclass
class Row:
    name: str
    measured: str
    baseline: str = "-"
    ratio: float | None = None
    target: str = "-"
    noise: float | None = None
    verdict: Verdict = "INFO"
    notes: list[str] = field(default_factory=list)
    ratio_text: str | None = None

    def cells(self) -> tuple[str, ...]:
        ratio = self.ratio_text or (f"{self.ratio:.2f}" if self.ratio is not None else "-")
        noise = f"±{self.noise * 100:.0f}%" if self.noise is not None else "-"
        return (self.name, self.measured, self.baseline, ratio, self.target, noise, self.verdict)


def at_least(ratio: float, target: float, noise: float) -> Verdict:
    if math.isnan(ratio):
        return "ERROR"
    if ratio >= target:
        return "PASS"
    return "NOISE" if ratio >= target * (1.0 - noise) else "FAIL"


def at_most(value: float, limit: float, noise: float) -> Verdict:
    if value <= limit:
        return "PASS"
    return "NOISE" if value <= limit + noise else "FAIL"


def error_row(name: str, exc: BaseException) -> Row:
    return Row(name, f"{type(exc).__name__}: {exc}".splitlines()[0][:100], verdict="ERROR")


def render(rows: list[Row]) -> str:
    table = [HEADER, *(row.cells() for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    lines = [_line(HEADER, widths), _line(tuple("-" * w for w in widths), widths)]
    for row in rows:
        lines.append(_line(row.cells(), widths))
        lines.extend(f"    {note}" for note in row.notes)
    return "\n".join(lines)


def _line(cells: tuple[str, ...], widths: list[int]) -> str:
    return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()


def exit_code(rows: list[Row]) -> int:
    return 1 if any(row.verdict in ("FAIL", "ERROR") for row in rows) else 0
