"""`labelstream serve`: the API alone, as a real subprocess, ready without any Kafka partitions."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import openai

from tests.test_http_combined import free_port
from tests.worker_process import REPO_ROOT, WorkerProcess

KEY = "sk-serve-test"


def test_serve_answers_the_openai_client_and_stops_cleanly(
    worker_env: Callable[..., dict[str, str]], tmp_path: Path,
) -> None:
    port = free_port()
    env = worker_env(LABELSTREAM_HTTP__HOST="127.0.0.1", LABELSTREAM_HTTP__PORT=str(port),
                     LABELSTREAM_HTTP__API_KEYS=json.dumps([KEY]), LABELSTREAM_TAXONOMY__FEED_ENABLED="false",
                     LABELSTREAM_TAXONOMY__WATCH_INTERVAL_S="0",
                     LABELSTREAM_TAXONOMY__PATH=str(REPO_ROOT / "pipeline" / "data" / "everyday.yaml"))
    stdout_path, stderr_path = tmp_path / "serve.stdout", tmp_path / "serve.stderr"
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "labelstream.cli", "serve"], cwd=REPO_ROOT, env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err)
    server = WorkerProcess("serve", proc, stdout_path, stderr_path)
    try:
        listening = server.wait_for_event("http_listening", timeout_s=120)
        assert listening["port"] == port
        url = f"http://127.0.0.1:{port}"
        # No consumer, so readiness does not wait for partitions.
        ready = httpx.get(f"{url}/readyz", timeout=10)
        assert ready.status_code == 200, ready.text
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        model = client.models.list().data[0].id
        assert model == "tiny-convnext-clip"
        response = client.embeddings.create(model=model, input=["a photo of a dog", "a cat"])
        assert [len(d.embedding) for d in response.data] == [64, 64]
        # The plain key never reaches the logs, not even in the full-settings `starting` line.
        assert KEY not in server.log_text()
        server.signal(signal.SIGTERM)
        assert server.wait(timeout_s=30) == 0
        assert server.events("stopped")
    finally:
        server.kill()
