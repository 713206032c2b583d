"""Driving a terminal program in a private tmux server and reading its screen."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

TmuxRunner = Callable[..., str]


@contextmanager
def private_tmux(prefix: str) -> Iterator[TmuxRunner]:
    """A tmux server on its own socket, killed afterwards; yields a runner for tmux commands."""
    # `make setup` installs tmux; a missing one is a broken set-up, not a reason to skip.
    assert shutil.which("tmux") is not None, "tmux is not installed: run `make setup` (apt-get install -y tmux)"
    socket_name = f"{prefix}-{uuid.uuid4().hex[:8]}"

    def run(*args: str) -> str:
        return subprocess.run(["tmux", "-L", socket_name, *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout

    try:
        yield run
    finally:
        subprocess.run(["tmux", "-L", socket_name, "kill-server"], capture_output=True, timeout=30)


def wait_for_pane(tmux: TmuxRunner, pattern: str, timeout_s: float = 30.0, target: str = "top") -> str:
    deadline = time.monotonic() + timeout_s
    screen = ""
    while time.monotonic() < deadline:
        screen = tmux("capture-pane", "-p", "-t", target)
        if re.search(pattern, screen, re.MULTILINE):
            return screen
        time.sleep(0.2)
    raise AssertionError(f"pane never matched {pattern!r}; it shows:\n{screen}")
