"""``make demo`` end to end (``modelyard up --demo`` on the built-in stack): it must pass and leave nothing running."""

from __future__ import annotations

import subprocess

import pytest

from modelyard.launcher import modelyard_argv


@pytest.mark.slow
def test_demo_runs_the_tour_and_the_stepped_traffic_and_exits_zero(tmp_path) -> None:  # type: ignore[no-untyped-def]
    done = subprocess.run(
        modelyard_argv("up", "--demo", "--no-view", "--listen", "127.0.0.1:0", "--balancer-admin", "127.0.0.1:0",
                       "--autoscaler-admin", "127.0.0.1:0"),
        capture_output=True, text=True, timeout=240, check=False, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for shown in ("modelyard health", "modelyard models", "modelyard infer add_sub", "modelyard infer text_sentiment_demo",
                  "modelyard infer token_stream_demo --stream", "modelyard bench identity", "curl -s http"):
        assert shown in done.stdout
    assert "no request failed" in done.stdout
    assert "pool text" in done.stdout and (tmp_path / "modelyard-demo.png").exists()
    assert "max 1 " not in done.stdout.split("pool text", 1)[1].splitlines()[0]  # the text pool scaled out
