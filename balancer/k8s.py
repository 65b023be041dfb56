"""Kubernetes EndpointSlice discovery: list, then watch, the slices of one Service.

Uses kubernetes-asyncio's ``DiscoveryV1Api.list_namespaced_endpoint_slice`` with
``labelSelector=kubernetes.io/service-name=<service>``, then a watch from the list's
resourceVersion (re-listed after every closed, expired or failed watch). In-cluster it
loads the service-account config; ``api_server`` points it at any other API server
(the tests run a small in-test HTTP server speaking these endpoints). Ready endpoints
(``conditions.ready`` not false) become ``ip:port`` for the configured port name, with
``ip:<http port>`` as the HTTP (REST) address where the slice has a port named ``http_port_name``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp

from modelyard.balancer.config import KubernetesConfig
from modelyard.balancer.metrics import Stats
from modelyard.balancer.pool import Pool

#: seconds a watch request stays open before the API server ends it and we re-list
WATCH_TIMEOUT = 300

log = logging.getLogger("modelyard.balancer.k8s")


def slice_endpoints(item: dict[str, Any], port_name: str) -> list[str]:
    """``ip:port`` of the ready endpoints of one EndpointSlice object."""
    return [grpc for grpc, _ in slice_members(item, port_name, "")]


def slice_members(item: dict[str, Any], port_name: str, http_port_name: str) -> list[tuple[str, str | None]]:
    """(``ip:port``, ``ip:http_port`` or None) of the ready endpoints of one EndpointSlice object."""
    ports = item.get("ports") or []
    port = next((p.get("port") for p in ports if not port_name or p.get("name") == port_name), None)
    if port is None:
        return []
    http_port = next((p.get("port") for p in ports if http_port_name and p.get("name") == http_port_name), None)

    def at(addr: str, p: int) -> str:
        return f"[{addr}]:{p}" if ":" in addr else f"{addr}:{p}"

    out = []
    for ep in item.get("endpoints") or []:
        if (ep.get("conditions") or {}).get("ready") is False:
            continue
        for addr in ep.get("addresses") or []:
            out.append((at(addr, port), at(addr, http_port) if http_port else None))
    return out


class EndpointSliceSource:
    """Keeps ``pool``'s ``kubernetes`` source equal to the ready endpoints of a Service's slices."""

    def __init__(self, pool: Pool, cfg: KubernetesConfig, stats: Stats) -> None:
        self.pool, self.cfg, self.stats = pool, cfg, stats
        self.slices: dict[str, list[tuple[str, str | None]]] = {}

    def _publish(self) -> None:
        members = dict(sorted({m for eps in self.slices.values() for m in eps}, key=lambda m: (m[0], m[1] or "")))
        self.pool.set_source("kubernetes", [(a, 1.0, http) for a, http in members.items()])

    def _api_client(self) -> Any:
        from kubernetes_asyncio import client, config

        if self.cfg.api_server:
            return client.ApiClient(client.Configuration(host=self.cfg.api_server.rstrip("/")))
        config.load_incluster_config()  # raises ConfigException outside a cluster
        return client.ApiClient()

    async def run(self) -> None:
        try:
            from kubernetes_asyncio import client, watch
            from kubernetes_asyncio.client.exceptions import ApiException
        except ImportError as exc:
            raise RuntimeError("Kubernetes discovery needs kubernetes-asyncio: pip install 'modelyard[k8s]'") from exc

        selector = f"kubernetes.io/service-name={self.cfg.service}"
        ns = self.cfg.namespace
        async with self._api_client() as api_client:
            api = client.DiscoveryV1Api(api_client)
            while True:
                try:
                    resp = await api.list_namespaced_endpoint_slice(ns, label_selector=selector,
                                                                    _preload_content=False)
                    body = json.loads(await resp.read())  # type: ignore[attr-defined]  # raw response
                    self.slices = {i["metadata"]["name"]: self._members(i) for i in body.get("items") or []}
                    self._publish()
                    rv = (body.get("metadata") or {}).get("resourceVersion", "")
                    w = watch.Watch()
                    try:
                        async for ev in w.stream(api.list_namespaced_endpoint_slice, ns, label_selector=selector,
                                                 resource_version=rv, timeout_seconds=WATCH_TIMEOUT):
                            self.apply_event({"type": ev["type"], "object": ev["raw_object"]})
                    finally:
                        await w.close()
                except (TimeoutError, aiohttp.ClientError, ApiException, ValueError, KeyError) as exc:
                    self.stats.count(self.pool.name, "discovery_k8s_errors")
                    log.warning("EndpointSlice watch for %s: %s (keeping the previous list)", self.cfg.service, exc)
                await asyncio.sleep(1.0)  # relist after a closed or failed watch

    def _members(self, item: dict[str, Any]) -> list[tuple[str, str | None]]:
        return slice_members(item, self.cfg.port_name, self.cfg.http_port_name)

    def apply_event(self, event: dict[str, Any]) -> None:
        """Apply one watch event (ADDED / MODIFIED / DELETED) and republish."""
        obj = event.get("object") or {}
        name = (obj.get("metadata") or {}).get("name")
        if not name:
            return
        if event.get("type") == "DELETED":
            self.slices.pop(name, None)
        elif event.get("type") in ("ADDED", "MODIFIED"):
            self.slices[name] = self._members(obj)
        else:
            return
        self._publish()
