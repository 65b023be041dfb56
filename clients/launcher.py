"""Start ``modelyard serve`` as a child process on free ports and wait for its ready line.

Used by ``make demo``, the test fixtures and anything else that needs a real server
process: one implementation of "spawn, wait for ready with a deadline, always stop".
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import IO

READY_PREFIX = "modelyard ready "
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class Endpoints:
    """Where a started server listens."""

    grpc: str
    http: str


def parse_ready_line(line: str) -> Endpoints | None:
    """``modelyard ready grpc=H:P http=H:P`` -> Endpoints; None for any other line."""
    if not line.startswith(READY_PREFIX):
        return None
    fields = dict(part.split("=", 1) for part in line[len(READY_PREFIX) :].split() if "=" in part)
    if "grpc" not in fields or "http" not in fields:
        return None
    return Endpoints(grpc=fields["grpc"], http=fields["http"])


def modelyard_argv(*args: str) -> list[str]:
    """The ``modelyard`` command run with this interpreter (works without the venv on PATH)."""
    return [sys.executable, "-m", "modelyard.clients.cli", *args]


class ServerProcess:
    """``modelyard serve`` on free ports as a child process; a context manager that always stops it."""

    def __init__(self, extra_args: Sequence[str] = (), start_timeout: float = START_TIMEOUT_S,
                 env: Mapping[str, str] | None = None) -> None:
        self.extra_args = list(extra_args)
        self.start_timeout = start_timeout
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
        self.endpoints: Endpoints | None = None
        self.proc: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._log: IO[str] | None = None

    def start(self) -> Endpoints:
        """Spawn the server and wait (up to ``start_timeout``) for its ready line."""
        self._log = tempfile.TemporaryFile(mode="w+", prefix="modelyard-demo-server-")
        argv = self.argv()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1,
                                     env=self.env)
        threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True).start()
        deadline = time.monotonic() + self.start_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"server not ready after {self.start_timeout:.0f}s\n{self.log_tail()}")
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"server exited with status {self.proc.wait()} before it was ready\n{self.log_tail()}")
            endpoints = self.parse_ready(line.strip())
            if endpoints is not None:
                self.endpoints = endpoints
                return endpoints

    def argv(self) -> list[str]:
        """The command line (the serve subcommand on free ports)."""
        return modelyard_argv("serve", "--grpc-port", "0", "--http-port", "0", *self.extra_args)

    def parse_ready(self, line: str) -> Endpoints | None:
        """Endpoints from the process's ready line; None for any other line."""
        return parse_ready_line(line)

    def _pump(self, stream: IO[str] | None) -> None:
        # Keep draining stdout so the server can never block on a full pipe.
        if stream is None:
            return
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the gRPC endpoint (after :meth:`start`)."""
        assert self.endpoints is not None, "server not started"
        return self.endpoints.grpc

    @property
    def http_url(self) -> str:
        """``http://host:port`` of the REST endpoint (after :meth:`start`)."""
        assert self.endpoints is not None, "server not started"
        return f"http://{self.endpoints.http}"

    def read_log(self) -> str:
        """Everything the server wrote to stderr so far."""
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        return self._log.read()

    def log_tail(self, lines: int = 20) -> str:
        return "".join(self.read_log().splitlines(keepends=True)[-lines:])

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait for the graceful shutdown, SIGKILL if it overstays; returns the exit status."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None
        return proc.returncode

    def __enter__(self) -> ServerProcess:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()




class BalancerProcess(ServerProcess):
    """``modelyard balance`` in front of ``upstreams`` on free ports; ``http`` is its admin address."""

    def __init__(self, upstreams: Sequence[str], extra_args: Sequence[str] = (),
                 start_timeout: float = START_TIMEOUT_S) -> None:
        super().__init__(extra_args, start_timeout)
        self.upstreams = list(upstreams)

    def argv(self) -> list[str]:
        return modelyard_argv("balance", "--listen", "127.0.0.1:0", "--admin-port", "0",
                              "--endpoints", ",".join(self.upstreams), *self.extra_args)

    def parse_ready(self, line: str) -> Endpoints | None:
        # "modelyard balance listening on PORT, admin http://127.0.0.1:APORT workers=1 pools=default"
        prefix = "modelyard balance listening on "
        if not line.startswith(prefix) or ", admin http://" not in line:
            return None
        port = line[len(prefix):].split(",", 1)[0]
        admin = line.split(", admin http://", 1)[1].split()[0]
        return Endpoints(grpc=f"127.0.0.1:{port}", http=admin)
