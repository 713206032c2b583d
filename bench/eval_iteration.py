"""`labelstream eval` twice on the same images: the first run, then a run with changed prompts (issue 7).

The first run starts from an empty image-embedding cache and encodes every
image; the second evaluates a reworded taxonomy, so it loads the cached image
embeddings and only computes the new text features. Both go through the CLI's
own entry point (`labelstream.cli.main(["eval", ...])`) in this process, after
a warm-up eval on other images, so neither pays the interpreter start and the
imports; `cli_wall` runs the same pair as `labelstream eval` subprocesses,
where those fixed costs are included.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.corpus import CACHE_DIR, tiny_model_files
from bench.stream import BATCH_SIZE

CLASSES = ("nominal", "local", "global")
# One copy of the taxonomy, shared with the eval tests.
TEXTILE_TAXONOMY = (Path(__file__).resolve().parent.parent / "examples" / "textile.yaml").read_text()
# The prompt iteration: other prompts and an extra template, same classes.
REWORDED_TAXONOMY = (
    TEXTILE_TAXONOMY.replace("flawless woven textile", "perfect plain textile")
    .replace("all over", "everywhere")
    .replace('"a close-up photo of {} cloth."]', '"a close-up photo of {} cloth.", "a scan of {} material."]')
)


@dataclass(frozen=True)
class EvalRun:
    wall_s: float
    image_s: float  # the output's embedding_cache.seconds: encoding, or loading the cache
    cache_hit: bool
    images_encoded: int
    n_images: int


@dataclass(frozen=True)
class EvalPair:
    first: EvalRun
    second: EvalRun

    @property
    def ratio(self) -> float:
        return self.first.wall_s / self.second.wall_s


def textile_folder(per_class: int) -> Path:
    """The first `per_class` textile photos of each class in ImageFolder layout (made once under bench/.cache)."""
    folder = CACHE_DIR / f"textiles-{per_class}"
    if not (folder / ".complete").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        for label in CLASSES:
            (folder / label).mkdir(parents=True)
            for source in sorted((_textile_root() / label).glob("*.jpg"))[:per_class]:
                shutil.copyfile(source, folder / label / source.name)
        (folder / ".complete").touch()
    return folder


def _textile_root() -> Path:
    import conformal_clip_data

    return Path(conformal_clip_data.__file__).parent / "data" / "textile_images" / "simulated"


def measure_in_process(folder: Path, warmup_folder: Path, repeats: int) -> list[EvalPair]:
    """`repeats` (first, second) pairs, each from an empty embedding and classifier cache."""
    with _eval_env():
        _pair(warmup_folder, _in_process)
        return [_pair(folder, _in_process) for _ in range(repeats)]


def measure_cli(folder: Path) -> EvalPair:
    """One pair as `labelstream eval` subprocesses (interpreter start, imports and model load included)."""
    with _eval_env():
        return _pair(folder, _subprocess)


def _pair(folder: Path, runner: Callable[[Path, Path, Path], EvalRun]) -> EvalPair:
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as scratch:
        work = Path(scratch)
        (work / "textile.yaml").write_text(TEXTILE_TAXONOMY)
        (work / "reworded.yaml").write_text(REWORDED_TAXONOMY)
        os.environ["LABELSTREAM_TAXONOMY__CACHE_DIR"] = str(work / "classifiers")
        first = runner(folder, work / "textile.yaml", work)
        second = runner(folder, work / "reworded.yaml", work)
    if first.cache_hit or not second.cache_hit or second.images_encoded:
        raise RuntimeError(f"embedding cache did not behave: first {first}, second {second}")
    return EvalPair(first, second)


def _arguments(folder: Path, taxonomy: Path, work: Path) -> list[str]:
    return ["eval", str(folder), "--taxonomy", str(taxonomy), "--json", str(work / "out.json"),
            "--cache-dir", str(work / "embeddings")]  # fmt: skip


def _in_process(folder: Path, taxonomy: Path, work: Path) -> EvalRun:
    from labelstream.cli import main as cli_main

    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        code = cli_main(_arguments(folder, taxonomy, work))
    wall_s = time.perf_counter() - started
    return _run_of(code, wall_s, work)


def _subprocess(folder: Path, taxonomy: Path, work: Path) -> EvalRun:
    script = Path(sys.executable).with_name("labelstream")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "labelstream.cli"]
    started = time.perf_counter()
    done = subprocess.run([*command, *_arguments(folder, taxonomy, work)], capture_output=True, text=True, timeout=600)
    wall_s = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"labelstream eval exited {done.returncode}:\n{done.stderr[-2000:]}")
    return _run_of(done.returncode, wall_s, work)


def _run_of(code: int, wall_s: float, work: Path) -> EvalRun:
    if code != 0:
        raise RuntimeError(f"labelstream eval exited {code}")
    output = json.loads((work / "out.json").read_text())
    cache = output["embedding_cache"]
    return EvalRun(wall_s, cache["seconds"], cache["hit"], cache["images_encoded"], output["n_images"])


@contextlib.contextmanager
def _eval_env() -> Iterator[None]:
    config, checkpoint = tiny_model_files()
    overrides = {
        "LABELSTREAM_MODEL__NAME": str(config),
        "LABELSTREAM_MODEL__PRETRAINED": str(checkpoint),
        "LABELSTREAM_MODEL__DEVICE": "cpu",
        "LABELSTREAM_BATCH__MAX_SIZE": str(BATCH_SIZE),
        "LABELSTREAM_LOG__LEVEL": "WARNING",
        "LABELSTREAM_LOG__FORMAT": "console",
        "TQDM_DISABLE": "1",
    }
    saved = {name: os.environ.get(name) for name in [*overrides, "LABELSTREAM_TAXONOMY__CACHE_DIR"]}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
