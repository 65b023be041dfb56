"""Shared fixtures: real ``modelyard serve`` processes on free ports, always cleaned up."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from modelyard import launcher


class ServerProcess(launcher.ServerProcess):
    """A ``modelyard serve`` subprocess, started on construction; ``grpc_url`` / ``http_url``."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, ready_timeout: float = 60.0) -> None:
        super().__init__(args, start_timeout=ready_timeout, env=env)
        try:
            self.start()
        except BaseException:
            self.close()
            raise

    @property
    def grpc_port(self) -> int:
        return int(self.grpc_url.rsplit(":", 1)[1])

    @property
    def http_port(self) -> int:
        return int(self.http_url.rsplit(":", 1)[1])

    def terminate(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait; returns the exit code."""
        return self.stop(timeout)

    def close(self) -> None:
        self.stop(timeout=5.0)


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
