"""The shipped Envoy config (the alternative data plane) is valid for the real Envoy binary."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_envoy_yaml_validates_with_the_real_envoy() -> None:
    from envoy_proxy import envoy_binary

    try:
        envoy = envoy_binary()
    except (FileNotFoundError, RuntimeError) as exc:
        pytest.skip(f"envoy not installed: {exc}")
    out = subprocess.run([envoy, "--mode", "validate", "-c", str(ROOT / "envoy" / "envoy.yaml"), "-l", "error"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK" in out.stdout
