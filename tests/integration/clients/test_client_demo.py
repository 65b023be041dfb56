"""``make demo`` end to end: it must pass and leave nothing running."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


def test_demo_runs_every_step_and_exits_zero() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "modelyard.clients.demo"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for shown in ("modelyard health", "modelyard models", "modelyard infer add_sub", "modelyard infer text_sentiment_demo",
                  "modelyard infer token_stream_demo --stream", "modelyard bench identity", "curl -s -X POST"):
        assert shown in done.stdout
    assert "demo: all steps passed" in done.stdout
    assert "server stopped (exit status 0)" in done.stdout
    pid = int(re.search(r"server ready \(pid (\d+)\)", done.stdout).group(1))  # type: ignore[union-attr]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the server was reaped: not even a zombie is left
