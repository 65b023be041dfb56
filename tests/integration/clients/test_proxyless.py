"""The client library's proxyless mode: endpoints from the xDS control plane, the balancer's picker in-process."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from modelyard.clients import AsyncInferenceClient, InferenceClient
from modelyard.launcher import BalancerProcess, ServerProcess

pytest.importorskip("envoy.service.discovery.v3.ads_pb2")
pytestmark = pytest.mark.slow


def identity_requests(server: ServerProcess) -> float:
    with urllib.request.urlopen(f"{server.http_url}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith('modelyard_requests_total{model="identity",status="OK"'):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture
def plane() -> Iterator[tuple[list[ServerProcess], BalancerProcess]]:
    replicas = [ServerProcess(["--log-level", "warning"]) for _ in range(3)]
    try:
        for r in replicas:
            r.start()
        cfg = {"listeners": [{"address": "127.0.0.1:0"}], "admin": {"address": "127.0.0.1:0"},
               "xds": {"address": "127.0.0.1:0", "weight_interval": 0.5},
               "pools": {"text": {"endpoints": {"static": [r.grpc_url for r in replicas]},
                                  "health_check": {"interval": 0.5}}}}
        with BalancerProcess(config=cfg, extra_args=["--log-level", "WARNING"]) as balancer:
            yield replicas, balancer
    finally:
        for r in replicas:
            r.stop(timeout=5)


def test_the_sync_client_balances_by_itself_and_follows_a_drain(plane: Any) -> None:
    replicas, balancer = plane
    x = np.arange(4, dtype=np.int32)
    # round robin: the spread below is then certain (least_latency may rightly favour one replica)
    url = f"xds://{balancer.endpoints.fields['xds']}/text?picker=round_robin"
    with InferenceClient(url) as client:
        for _ in range(150):
            np.testing.assert_array_equal(client.infer("identity", {"INPUT0": x}).as_numpy("OUTPUT0"), x)
        counts = [identity_requests(r) for r in replicas]
        assert all(c > 5 for c in counts), counts  # spread over every replica, no proxy in the way
        req = urllib.request.Request(f"http://{balancer.endpoints.admin}/endpoints/drain", method="POST",
                                     data=json.dumps({"pool": "text", "address": replicas[0].grpc_url}).encode(),
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=5).read()
        deadline = time.monotonic() + 20
        drained = client._channel.resolver.pool.endpoints[replicas[0].grpc_url]
        while not drained.draining:  # the drain reaches the client over xDS
            assert time.monotonic() < deadline, "the drain did not reach the client"
            client.infer("identity", {"INPUT0": x})
        before = identity_requests(replicas[0])
        for _ in range(100):
            client.infer("identity", {"INPUT0": x})
        assert identity_requests(replicas[0]) == before


def test_the_asyncio_client_balances_by_itself(plane: Any) -> None:
    replicas, balancer = plane
    x = np.arange(4, dtype=np.int32)

    async def run() -> None:
        async with AsyncInferenceClient(f"xds://{balancer.endpoints.fields['xds']}/text") as client:
            results = await asyncio.gather(*(client.infer("identity", {"INPUT0": x}) for _ in range(120)))
            assert all((r.as_numpy("OUTPUT0") == x).all() for r in results)

    before = [identity_requests(r) for r in replicas]
    asyncio.run(run())
    after = [identity_requests(r) for r in replicas]
    assert all(b > a for a, b in zip(before, after, strict=True)), (before, after)
