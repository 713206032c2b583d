"""bench/gpu.py must run anywhere with `--device cpu --quick`, and write its JSON and markdown."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_gpu_bench_runs_on_the_cpu_and_writes_json_and_markdown(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "gpu.py"), "--device", "cpu", "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-bench.json").read_text())
    assert report["environment"]["device"] == "cpu"
    grid = {(r["precision"], r["channels_last"], r["batch"]) for r in report["model_only"]}
    assert grid == {(p, cl, b) for p in ("bf16", "fp16") for cl in (True, False) for b in (2, 4)}
    assert all(r["img_per_s"] > 0 and r["compile"] is False for r in report["model_only"])
    assert [r["decode"] for r in report["classify"]] == ["cpu-exact", "cpu-fast", "torchvision"]
    assert all(r["img_per_s"] > 0 and r["images"] == 8 for r in report["classify"])
    markdown = (tmp_path / "gpu-bench.md").read_text()
    assert "## Model only (image tower)" in markdown and "## Offline classify path" in markdown
    assert markdown.count("\n| bf16 |") + markdown.count("\n| fp16 |") == 8
    assert "torch.compile: not requested" in markdown
