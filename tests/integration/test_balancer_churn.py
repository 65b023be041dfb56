"""Replicas that die, stop or hang under load: 3 real ``modelyard serve`` behind a real ``modelyard balance``,
16 clients sending ModelInfer; one replica is hit a third of the way in. No request may fail."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from modelyard.launcher import BalancerProcess, ServerProcess
from modelyard.protos import grpc_service_pb2 as pb

INFER = "/inference.GRPCInferenceService/ModelInfer"
pytestmark = pytest.mark.slow


def request(i: int) -> bytes:
    req = pb.ModelInferRequest(model_name="identity", id=str(i))
    req.inputs.add(name="INPUT0", datatype="INT32", shape=[1])
    req.raw_input_contents.append((i % 1_000_000).to_bytes(4, "little"))
    return req.SerializeToString()


@pytest.fixture
def stack() -> Iterator[tuple[list[ServerProcess], BalancerProcess]]:
    replicas = [ServerProcess(["--log-level", "warning", "--grace", "10"]) for _ in range(3)]
    try:
        for r in replicas:
            r.start()
        # the balancer's defaults, as a user runs it (health every 2 s, outlier ejection after 5 failures)
        with BalancerProcess([r.grpc_url for r in replicas], ["--log-level", "WARNING"]) as balancer:
            yield replicas, balancer
    finally:
        for r in replicas:
            r.signal(signal.SIGCONT)
            r.stop(timeout=5)


async def load(address: str, seconds: float, hit: Any, at: float, clients: int = 16) -> tuple[int, Counter[str], list[float]]:
    ok = 0
    failed: Counter[str] = Counter()
    latencies: list[float] = []
    stop_at = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(address) as ch:
        call = ch.unary_unary(INFER)

        async def worker(w: int) -> None:
            nonlocal ok
            i = w * 10_000_000
            while time.monotonic() < stop_at:
                i += 1
                t0 = time.monotonic()
                try:
                    await call(request(i), timeout=10)
                    ok += 1
                    latencies.append(time.monotonic() - t0)
                except grpc.aio.AioRpcError as e:
                    failed[f"{e.code().name}: {e.details()}"] += 1

        async def trigger() -> None:
            await asyncio.sleep(at)
            hit()

        await asyncio.gather(trigger(), *(worker(w) for w in range(clients)))
    return ok, failed, latencies


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM", "SIGSTOP"])
def test_a_replica_killed_stopped_or_hung_under_load_costs_no_request(stack: Any, sig: str) -> None:
    replicas, balancer = stack
    assert balancer.endpoints is not None
    ok, failed, latencies = asyncio.run(load(balancer.endpoints.grpc, 9.0, lambda: replicas[1].signal(getattr(signal, sig)),
                                             at=3.0))
    assert ok > 1000
    assert not failed, f"{sum(failed.values())} of {ok + sum(failed.values())} failed: {dict(failed)}"
    latencies.sort()
    p999 = latencies[int(len(latencies) * 0.999)]
    # a hung replica costs at most a per-try timeout (hedged), never the client's 10 s deadline
    assert p999 < 2.0, f"p99.9 {p999:.3f}s"
