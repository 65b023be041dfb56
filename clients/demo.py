"""``make demo``: start a server on free ports, drive it with the CLI, stop it.

The demo is a list of steps (:func:`demo_steps`); each prints the command it stands
for, runs, and passes or fails. Add a step by adding to the list.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import IO

READY_PREFIX = "modelyard ready "
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
STEP_TIMEOUT_S = 60.0


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

    def __init__(self, extra_args: Sequence[str] = (), start_timeout: float = START_TIMEOUT_S) -> None:
        self.extra_args = list(extra_args)
        self.start_timeout = start_timeout
        self.endpoints: Endpoints | None = None
        self.proc: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._log: IO[str] | None = None

    def start(self) -> Endpoints:
        """Spawn the server and wait (up to ``start_timeout``) for its ready line."""
        self._log = tempfile.TemporaryFile(mode="w+", prefix="modelyard-demo-server-")
        argv = modelyard_argv("serve", "--grpc-port", "0", "--http-port", "0", "--grace", "5", *self.extra_args)
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1)
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
            endpoints = parse_ready_line(line.strip())
            if endpoints is not None:
                self.endpoints = endpoints
                return endpoints

    def _pump(self, stream: IO[str] | None) -> None:
        # Keep draining stdout so the server can never block on a full pipe.
        if stream is None:
            return
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)

    def log_tail(self, lines: int = 20) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        return "".join(self._log.readlines()[-lines:])

    def stop(self) -> int | None:
        """SIGTERM, wait for the graceful shutdown, SIGKILL if it overstays; returns the exit status."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
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


@dataclass(frozen=True, slots=True)
class Step:
    """One demo step: ``shown`` is the command line printed; ``run`` returns True on success."""

    title: str
    shown: str
    run: Callable[[], bool]


def cli_step(title: str, *args: str) -> Step:
    """A step that runs ``modelyard ARGS...`` and passes when it exits 0."""
    shown = "modelyard " + " ".join(_quote(a) for a in args)

    def run() -> bool:
        env = {**os.environ, "COLUMNS": os.environ.get("COLUMNS", "110")}
        try:
            done = subprocess.run(modelyard_argv(*args), timeout=STEP_TIMEOUT_S, env=env, check=False)
        except subprocess.TimeoutExpired:
            print(f"timed out after {STEP_TIMEOUT_S:.0f}s")
            return False
        return done.returncode == 0

    return Step(title, shown, run)


def rest_infer_step(title: str, http: str, model: str, body: dict[str, object]) -> Step:
    """POST /v2/models/MODEL/infer with urllib; shown as the equivalent curl command."""
    url = f"http://{http}/v2/models/{model}/infer"
    payload = json.dumps(body)
    shown = f"curl -s -X POST {url} -H 'Content-Type: application/json' -d '{payload}'"

    def run() -> bool:
        request = urllib.request.Request(url, data=payload.encode(), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=STEP_TIMEOUT_S) as response:
                text = response.read().decode()
                print(json.dumps(json.loads(text)))
                return response.status == 200
        except OSError as exc:
            print(f"request failed: {exc}")
            return False

    return Step(title, shown, run)


def _quote(arg: str) -> str:
    safe = all(c.isalnum() or c in "-_=.,:/@[]" for c in arg)
    return arg if safe and arg else "'" + arg.replace("'", "'\\''") + "'"


def demo_steps(server: Endpoints) -> list[Step]:
    """What the demo shows, in order."""
    url = ("--url", server.grpc)
    return [
        cli_step("Server and model health", "health", *url),
        cli_step("The model repository", "models", *url),
        cli_step("add_sub: OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1",
                 "infer", "add_sub", "-i", "INPUT0=[1,2,3,4]", "-i", "INPUT1=[10,20,30,40]", *url),
        cli_step("text_sentiment_demo: a batch of two sentences (BYTES in, BYTES + FP32 out)",
                 "infer", "text_sentiment_demo", "-i", 'TEXT=["what a great day", "this is awful"]', *url),
        cli_step("token_stream_demo: one streamed response per token (ModelStreamInfer)",
                 "infer", "token_stream_demo", "--stream", "-i", "TEXT=modelyard streams tokens back", *url),
        cli_step("A short closed-loop benchmark of identity",
                 "bench", "identity", "-i", "INPUT0=[1.0,2.0,3.0,4.0]", "-c", "4", "--duration", "2", *url),
        rest_infer_step("The same add_sub over REST (KServe v2 JSON)", server.http, "add_sub", {
            "inputs": [
                {"name": "INPUT0", "shape": [4], "datatype": "FP32", "data": [1, 2, 3, 4]},
                {"name": "INPUT1", "shape": [4], "datatype": "FP32", "data": [10, 20, 30, 40]},
            ]
        }),
    ]


def run_steps(steps: Sequence[Step]) -> list[str]:
    """Run every step (a failure does not stop the rest); returns the titles of failed ones."""
    failed = []
    for number, step in enumerate(steps, 1):
        print(f"\n=== {number}/{len(steps)} {step.title}", flush=True)
        print(f"$ {step.shown}", flush=True)
        try:
            ok = step.run()
        except Exception as exc:  # a broken step is reported, the demo goes on
            print(f"step raised {type(exc).__name__}: {exc}")
            ok = False
        sys.stdout.flush()
        if not ok:
            print(f"!!! step failed: {step.title}", flush=True)
            failed.append(step.title)
    return failed


def main() -> int:
    """Start a server, run the steps, stop the server; exit 1 if anything failed."""
    print("$ modelyard serve --grpc-port 0 --http-port 0   (demo models, free ports)", flush=True)
    try:
        with ServerProcess() as server:
            assert server.endpoints is not None
            pid = server.proc.pid if server.proc is not None else None
            print(f"server ready (pid {pid}): gRPC {server.endpoints.grpc}, HTTP {server.endpoints.http}", flush=True)
            failed = run_steps(demo_steps(server.endpoints))
            print("\n$ kill -TERM <server>", flush=True)
        status = server.proc.returncode if server.proc is not None else None
    except RuntimeError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    print(f"server stopped (exit status {status})")
    if status != 0:
        failed.append("server exits 0 on SIGTERM")
    if failed:
        print(f"\ndemo: {len(failed)} step(s) failed: {'; '.join(failed)}", file=sys.stderr)
        return 1
    print("\ndemo: all steps passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Endpoints", "ServerProcess", "Step", "cli_step", "demo_steps", "main", "rest_infer_step", "run_steps"]
