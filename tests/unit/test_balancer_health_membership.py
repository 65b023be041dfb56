"""Health checking follows pool membership, and lets go of addresses that leave."""

from __future__ import annotations

import random

from modelyard.balancer.config import HealthCheckConfig, PoolConfig
from modelyard.balancer.health import HealthChecker
from modelyard.balancer.metrics import Stats
from modelyard.balancer.pool import Pool


class RecordingProbe:
    def __init__(self) -> None:
        self.acquired: list[str] = []
        self.released: list[str] = []

    async def __call__(self, address: str, service: str, timeout: float) -> bool:  # noqa: ASYNC109
        return True

    def acquire(self, address: str) -> None:
        self.acquired.append(address)

    def release(self, address: str) -> None:
        self.released.append(address)


async def test_removed_endpoint_releases_its_probe_and_forgets_its_streak() -> None:
    cfg = PoolConfig(picker="round_robin", health_check=HealthCheckConfig(interval=3600))
    pool = Pool("p", cfg, rng=random.Random(0))
    pool.set_source("static", [("127.0.0.1:1", 1.0), ("127.0.0.1:2", 1.0)])
    probe = RecordingProbe()
    checker = HealthChecker(pool, probe, Stats(), rng=random.Random(0))
    checker.sync()
    assert sorted(probe.acquired) == ["127.0.0.1:1", "127.0.0.1:2"]
    await checker.check_once("127.0.0.1:2")
    pool.set_source("static", [("127.0.0.1:1", 1.0)])
    checker.sync()
    assert probe.released == ["127.0.0.1:2"]
    assert "127.0.0.1:2" not in checker._streak
    checker.sync()  # idempotent: nothing released twice
    assert probe.released == ["127.0.0.1:2"]
    for task in checker._tasks.values():
        task.cancel()
