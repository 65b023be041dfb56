"""Shared fixtures: real ``modelyard serve`` processes on free ports, always cleaned up."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
READY = re.compile(r"modelyard ready grpc=(\S+):(\d+) http=(\S+):(\d+)")
MODELYARD = [sys.executable, "-m", "modelyard.clients.cli"]


class ServerProcess:
    """A ``modelyard serve`` subprocess; ``grpc_url`` / ``http_url`` once started."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, ready_timeout: float = 60.0) -> None:
        self.args = ["serve", "--grpc-port", "0", "--http-port", "0", *args]
        self.log = tempfile.NamedTemporaryFile(prefix="modelyard-serve-", suffix=".log", delete=False)
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [*MODELYARD, *self.args], stdout=subprocess.PIPE, stderr=self.log, env=full_env, text=True
        )
        self.grpc_port = self.http_port = 0
        self._wait_ready(ready_timeout)

    def _wait_ready(self, timeout: float) -> None:
        found: list[re.Match[str]] = []
        done = threading.Event()

        def reader() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                m = READY.search(line)
                if m:
                    found.append(m)
                    done.set()
            done.set()

        threading.Thread(target=reader, daemon=True).start()
        if not done.wait(timeout) or not found:
            self.kill()
            raise RuntimeError(f"modelyard serve did not become ready; log:\n{self.read_log()}")
        m = found[0]
        self.grpc_port, self.http_port = int(m.group(2)), int(m.group(4))

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def read_log(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        self.kill()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


@pytest.fixture
def start_server() -> Iterator[type[ServerProcess]]:
    """Factory: ``start_server("--model-repository", path)``; every server started is killed at teardown."""
    started: list[ServerProcess] = []

    class _Tracked(ServerProcess):
        def __init__(self, *args: str, **kwargs: object) -> None:
            started.append(self)
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    yield _Tracked
    for server in started:
        server.close()


@pytest.fixture(scope="module")
def demo_server() -> Iterator[ServerProcess]:
    """One server on the built-in demo models, shared by a test module."""
    server = ServerProcess()
    try:
        yield server
    finally:
        server.close()


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02, message: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


@pytest.fixture
def poll():  # type: ignore[no-untyped-def]
    """``poll(predicate, timeout=...)``: wait for a condition with a deadline (tests never sleep blindly)."""
    return wait_for


@pytest.fixture(scope="session")
def server_cls() -> type[ServerProcess]:
    """The ServerProcess class, for module-scoped fixtures that start their own server
    (test modules cannot import conftest under --import-mode=importlib)."""
    return ServerProcess
