"""EndpointSlice discovery against an in-test fake Kubernetes API server (aiohttp)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

from aiohttp import web

from modelyard.balancer.config import HealthCheckConfig, KubernetesConfig, PoolConfig
from modelyard.balancer.k8s import EndpointSliceSource
from modelyard.balancer.metrics import Stats
from modelyard.balancer.pool import Pool


def eslice(name: str, ips: list[str], ready: bool = True) -> dict[str, Any]:
    return {"metadata": {"name": name, "resourceVersion": "8"}, "addressType": "IPv4",
            "ports": [{"name": "grpc", "port": 8001}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}} for ip in ips]}


async def test_endpointslice_list_then_watch_updates_the_pool() -> None:
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    seen: list[str] = []
    watches: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(request.query.get("labelSelector", ""))
        if request.query.get("watch") not in ("1", "true", "True"):
            return web.json_response({"metadata": {"resourceVersion": "7"},
                                      "items": [eslice("s1", ["127.0.10.1", "127.0.10.2"])]})
        watches.append(request.query.get("resourceVersion", ""))
        resp = web.StreamResponse()
        await resp.prepare(request)
        while True:
            ev = await events.get()
            if ev["type"] == "END":
                return resp
            await resp.write(json.dumps(ev).encode() + b"\n")

    app = web.Application()
    app.router.add_get("/apis/discovery.k8s.io/v1/namespaces/ml/endpointslices", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    pool = Pool("p", PoolConfig(health_check=HealthCheckConfig(enabled=False)))
    src = EndpointSliceSource(pool, KubernetesConfig(service="models", namespace="ml", port_name="grpc",
                                                     api_server=f"http://127.0.0.1:{port}"), Stats())
    task = asyncio.ensure_future(src.run())

    async def until(want: set[str]) -> None:
        deadline = time.monotonic() + 10
        while set(pool.endpoints) != want:
            assert time.monotonic() < deadline, f"endpoints {set(pool.endpoints)} != {want}"
            await asyncio.sleep(0.01)

    try:
        await until({"127.0.10.1:8001", "127.0.10.2:8001"})
        assert seen[0] == "kubernetes.io/service-name=models"
        await events.put({"type": "ADDED", "object": eslice("s2", ["127.0.10.3"])})
        await until({"127.0.10.1:8001", "127.0.10.2:8001", "127.0.10.3:8001"})
        assert watches[0] == "7", "the watch must start from the list's resourceVersion"
        await events.put({"type": "MODIFIED", "object": eslice("s1", ["127.0.10.1"])})
        await until({"127.0.10.1:8001", "127.0.10.3:8001"})
        await events.put({"type": "MODIFIED", "object": eslice("s2", ["127.0.10.3"], ready=False)})
        await until({"127.0.10.1:8001"})
        await events.put({"type": "DELETED", "object": eslice("s1", [])})
        await until(set())
    finally:
        await events.put({"type": "END"})
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await runner.cleanup()


async def test_dns_source_resolves_each_record_to_an_endpoint() -> None:
    from modelyard.balancer.config import DnsConfig
    from modelyard.balancer.discovery import DnsSource

    pool = Pool("p", PoolConfig(health_check=HealthCheckConfig(enabled=False)))
    answers = [["127.0.10.1", "127.0.10.2"], ["127.0.10.2"]]

    async def resolver(name: str) -> list[str]:
        assert name == "models.ns.svc"
        return answers.pop(0)

    dns = DnsSource(pool, DnsConfig(name="models.ns.svc", port=8001), Stats(), resolver=resolver)
    await dns.refresh()
    assert set(pool.endpoints) == {"127.0.10.1:8001", "127.0.10.2:8001"}
    await dns.refresh()
    assert set(pool.endpoints) == {"127.0.10.2:8001"}


def test_file_source_reloads_on_change_and_keeps_the_list_on_bad_input(tmp_path: Any) -> None:
    from modelyard.balancer.discovery import FileSource

    f = tmp_path / "eps.json"
    f.write_text(json.dumps(["127.0.10.1:1", {"address": "127.0.10.2:1", "weight": 3}]))
    pool = Pool("p", PoolConfig(health_check=HealthCheckConfig(enabled=False)))
    stats = Stats()
    src = FileSource(pool, str(f), 1.0, stats)
    assert src.refresh()
    assert pool.endpoints["127.0.10.2:1"].weight == 3
    f.write_text("{not json")
    assert not src.refresh()
    assert set(pool.endpoints) == {"127.0.10.1:1", "127.0.10.2:1"}
    assert stats.events[("p", "discovery_file_errors")] == 1
