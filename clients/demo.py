"""``make demo``: start a server on free ports, drive it with the CLI, stop it.

The demo is a list of steps (:func:`demo_steps`); each prints the command it stands
for, runs, and passes or fails. Add a step by adding to the list.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from modelyard.launcher import BalancerProcess, Endpoints, ServerProcess, modelyard_argv

STEP_TIMEOUT_S = 60.0


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


def http_get_step(title: str, url: str, show: Callable[[object], str]) -> Step:
    """GET a JSON document and print ``show(document)``; shown as the equivalent curl command."""

    def run() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=STEP_TIMEOUT_S) as response:
                print(show(json.loads(response.read())))
                return response.status == 200
        except (OSError, ValueError) as exc:
            print(f"request failed: {exc}")
            return False

    return Step(title, f"curl -s {url}", run)


def _endpoint_lines(document: object) -> str:
    """One line per upstream of the balancer's /endpoints JSON (whatever fields it has)."""
    rows = []
    pools = document.get("pools", document) if isinstance(document, dict) else document
    items = pools.items() if isinstance(pools, dict) else [("", pools)]
    for _, endpoints in items:
        for ep in endpoints if isinstance(endpoints, list) else []:
            if isinstance(ep, dict):
                keep = {k: v for k, v in ep.items() if not isinstance(v, dict | list)}
                rows.append(" ".join(f"{k}={v}" for k, v in keep.items()))
    return "\n".join(rows) if rows else json.dumps(document)[:2000]


def balancer_steps(balancer: Endpoints) -> list[Step]:
    """Traffic through ``modelyard balance`` in front of two replicas."""
    url = ("--url", balancer.grpc)
    return [
        cli_step("Through the balancer: health and inference are proxied as raw gRPC",
                 "infer", "add_sub", "-i", "INPUT0=[1,2,3,4]", "-i", "INPUT1=[1,1,1,1]", *url),
        cli_step("Through the balancer: streaming", "infer", "token_stream_demo", "--stream",
                 "-i", "TEXT=balanced tokens", *url),
        cli_step("Sample traffic through the balancer (peak-EWMA over two replicas)",
                 "bench", "text_sentiment_demo", "-i", 'TEXT=["a great day"]', "-c", "8", "--duration", "2", *url),
        http_get_step("The balancer's view of its endpoints (admin API)",
                      f"http://{balancer.admin}/endpoints", _endpoint_lines),
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
        with ServerProcess(["--grace", "5"]) as server:
            assert server.endpoints is not None
            pid = server.proc.pid if server.proc is not None else None
            print(f"server ready (pid {pid}): gRPC {server.endpoints.grpc}, HTTP {server.endpoints.http}", flush=True)
            failed = run_steps(demo_steps(server.endpoints))
            print("\n$ modelyard serve ... (a second replica)   &&   modelyard balance --endpoints A,B", flush=True)
            with ServerProcess(["--grace", "5"]) as replica:
                assert replica.endpoints is not None
                with BalancerProcess([server.endpoints.grpc, replica.endpoints.grpc]) as balancer:
                    assert balancer.endpoints is not None
                    print(f"balancer ready: gRPC {balancer.endpoints.grpc}, admin {balancer.endpoints.admin}", flush=True)
                    failed += run_steps(balancer_steps(balancer.endpoints))
            print("\n$ kill -TERM <balancer> <replicas>", flush=True)
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


__all__ = ["Step", "balancer_steps", "cli_step", "demo_steps", "http_get_step", "main", "rest_infer_step", "run_steps"]
