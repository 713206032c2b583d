"""`labelstream demo`: the whole pipeline on its own embedded broker and S3 server, as a user runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_TIMEOUT_S = 300
IMAGES = 4
LABELS_PER_IMAGE = 3
# One table cell: "label (0.23)".
SCORED_LABEL = re.compile(r"[^,()]+ \((?:0|1)\.\d\d\)")


def table_rows(stdout: str) -> list[str]:
    """The lines between the table's dashed rule and the blank line after it."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if re.fullmatch(r"-+ +-+", line)) + 1
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return lines[start:end]


@pytest.mark.timeout(DEMO_TIMEOUT_S + 30)
def test_demo_labels_sample_photos_and_says_the_labels_are_meaningless() -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("LABELSTREAM_")}
    result = subprocess.run(
        [sys.executable, "-m", "labelstream.cli", "demo", "--images", str(IMAGES)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=DEMO_TIMEOUT_S, check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "real weights" in out and "are not available" in out
    assert "MEANINGLESS" in out and "labels are meaningless" in out
    rows = table_rows(out)
    assert len(rows) == IMAGES, out
    for row in rows:
        name, cells = row.split(None, 1)
        assert name.endswith(".jpg")
        assert len(SCORED_LABEL.findall(cells)) == LABELS_PER_IMAGE, row
    assert {"china.jpg", "flower.jpg"} <= {row.split()[0] for row in rows}
    assert f"{IMAGES} images labelled" in out
