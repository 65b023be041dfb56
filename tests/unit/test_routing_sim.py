"""The default picker holds under every load shape: the balancer's real picker classes against simulated
backends (benchmarks/routing_sim.py: fake clock, no scheduling noise), one of three endpoints +50 ms."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


@pytest.mark.parametrize("kind", ["io", "cpu"])
@pytest.mark.parametrize("load", ["paced", "burst"])
def test_least_latency_keeps_p99_and_throughput_with_a_slow_endpoint(kind: str, load: str) -> None:
    from routing_sim import simulate

    healthy = simulate("least_latency", kind, load, False, 8000)
    slow = simulate("least_latency", kind, load, True, 8000)
    assert slow["p99"] <= 1.25 * healthy["p99"], (healthy, slow)
    assert slow["rps"] >= 0.9 * healthy["rps"], (healthy, slow)


def test_peak_ewma_is_pushed_to_the_slow_endpoint_by_bursts_on_cpu_bound_servers() -> None:
    """The failure mode least_latency fixes (kept as a regression anchor for the comparison)."""
    from routing_sim import simulate

    healthy = simulate("peak_ewma", "cpu", "burst", False, 20000)
    slow = simulate("peak_ewma", "cpu", "burst", True, 20000)
    assert slow["p99"] > 2 * healthy["p99"]
