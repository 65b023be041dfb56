"""The tour ``make demo`` (``modelyard up --demo``) runs through the stack's balancer before its traffic.

The tour is a list of steps (:func:`demo_steps`); each prints the command it stands
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

from modelyard.launcher import modelyard_argv

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


def _quote(arg: str) -> str:
    safe = all(c.isalnum() or c in "-_=.,:/@[]" for c in arg)
    return arg if safe and arg else "'" + arg.replace("'", "'\\''") + "'"


def demo_steps(grpc: str, admin: str) -> list[Step]:
    """What the tour shows, in order, through the balancer at ``grpc`` (admin API at ``admin``)."""
    url = ("--url", grpc)
    return [
        cli_step("Server and model health (through the balancer)", "health", *url),
        cli_step("The model repository", "models", *url),
        cli_step("add_sub: OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1 (pool 'tools')",
                 "infer", "add_sub", "-i", "INPUT0=[1,2,3,4]", "-i", "INPUT1=[10,20,30,40]", *url),
        cli_step("text_sentiment_demo: a batch of two sentences (BYTES in, BYTES + FP32 out; pool 'text')",
                 "infer", "text_sentiment_demo", "-i", 'TEXT=["what a great day", "this is awful"]', *url),
        cli_step("token_stream_demo: one streamed response per token (ModelStreamInfer)",
                 "infer", "token_stream_demo", "--stream", "-i", "TEXT=modelyard streams tokens back", *url),
        cli_step("A short closed-loop benchmark of identity",
                 "bench", "identity", "-i", "INPUT0=[1.0,2.0,3.0,4.0]", "-c", "4", "--duration", "2", *url),
        http_get_step("The balancer's view of its endpoints (admin API)", f"http://{admin}/endpoints", _endpoint_lines),
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


__all__ = ["Step", "cli_step", "demo_steps", "http_get_step", "run_steps"]
