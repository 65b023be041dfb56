"""Kubernetes EndpointSlice discovery: list, then watch, the slices of one Service.

Talks to the API server's REST endpoints directly with aiohttp
(``/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices?labelSelector=kubernetes.io/service-name={svc}``
then ``&watch=1&resourceVersion=...``); in-cluster it uses the service-account token. Ready
endpoints (``conditions.ready`` not false) become ``ip:port`` for the configured port name.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
from pathlib import Path
from typing import Any

import aiohttp

from modelyard.balancer.config import KubernetesConfig
from modelyard.balancer.metrics import Stats
from modelyard.balancer.pool import Pool

log = logging.getLogger("modelyard.balancer.k8s")
SA = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def slice_endpoints(item: dict[str, Any], port_name: str) -> list[str]:
    """``ip:port`` of the ready endpoints of one EndpointSlice object."""
    ports = item.get("ports") or []
    port = next((p.get("port") for p in ports if not port_name or p.get("name") == port_name), None)
    if port is None:
        return []
    out = []
    for ep in item.get("endpoints") or []:
        if (ep.get("conditions") or {}).get("ready") is False:
            continue
        for addr in ep.get("addresses") or []:
            out.append(f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}")
    return out


class EndpointSliceSource:
    """Keeps ``pool``'s ``kubernetes`` source equal to the ready endpoints of a Service's slices."""

    def __init__(self, pool: Pool, cfg: KubernetesConfig, stats: Stats) -> None:
        self.pool, self.cfg, self.stats = pool, cfg, stats
        self.slices: dict[str, list[str]] = {}

    def _publish(self) -> None:
        addrs = sorted({a for eps in self.slices.values() for a in eps})
        self.pool.set_source("kubernetes", [(a, 1.0) for a in addrs])

    def _conn(self) -> tuple[str, dict[str, str], Any]:
        if self.cfg.api_server:
            return self.cfg.api_server.rstrip("/"), {}, None
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise RuntimeError("no api_server configured and not running in a cluster")
        ctx = ssl.create_default_context(cafile=str(SA / "ca.crt"))
        token = (SA / "token").read_text().strip()
        return f"https://{host}:{port}", {"Authorization": f"Bearer {token}"}, ctx

    async def run(self) -> None:
        base, headers, ctx = self._conn()
        url = (f"{base}/apis/discovery.k8s.io/v1/namespaces/{self.cfg.namespace}/endpointslices"
               f"?labelSelector=kubernetes.io%2Fservice-name%3D{self.cfg.service}")
        async with aiohttp.ClientSession(headers=headers) as session:
            while True:
                try:
                    async with session.get(url, ssl=ctx) as r:
                        r.raise_for_status()
                        body = await r.json()
                    self.slices = {i["metadata"]["name"]: slice_endpoints(i, self.cfg.port_name)
                                   for i in body.get("items", [])}
                    self._publish()
                    rv = body.get("metadata", {}).get("resourceVersion", "")
                    async with session.get(f"{url}&watch=1&resourceVersion={rv}", ssl=ctx,
                                           timeout=aiohttp.ClientTimeout(total=None, sock_read=300)) as r:
                        r.raise_for_status()
                        async for line in r.content:
                            if line.strip():
                                self.apply_event(json.loads(line))
                except (TimeoutError, aiohttp.ClientError, ValueError, KeyError) as exc:
                    self.stats.count(self.pool.name, "discovery_k8s_errors")
                    log.warning("EndpointSlice watch for %s: %s (keeping the previous list)", self.cfg.service, exc)
                await asyncio.sleep(1.0)  # relist after a closed or failed watch

    def apply_event(self, event: dict[str, Any]) -> None:
        """Apply one watch event (ADDED / MODIFIED / DELETED) and republish."""
        obj = event.get("object") or {}
        name = (obj.get("metadata") or {}).get("name")
        if not name:
            return
        if event.get("type") == "DELETED":
            self.slices.pop(name, None)
        elif event.get("type") in ("ADDED", "MODIFIED"):
            self.slices[name] = slice_endpoints(obj, self.cfg.port_name)
        else:
            return
        self._publish()
