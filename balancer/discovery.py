"""Endpoint sources: static list, watched file, DNS re-resolution (Kubernetes: ``k8s.py``).

Every source ends in ``pool.set_source(name, [(address, weight[, http]), ...])``; the pool
merges sources and rebuilds its immutable snapshot. Sources that fail to refresh
keep the last good list (and count the failure) rather than emptying the pool.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

import yaml

from modelyard.balancer.config import DnsConfig, host_port_ok
from modelyard.balancer.endpoint import Member
from modelyard.balancer.metrics import Stats
from modelyard.balancer.pool import Pool

log = logging.getLogger("modelyard.balancer.discovery")


def parse_endpoint_list(data: Any) -> list[Member]:
    """``["h:p", {"address": "h:p", "weight": 2, "http": "h:p2"}]`` or ``{"endpoints": [...]}`` ->
    [(address, weight)], with the HTTP address as a third item where an entry gives one."""
    if isinstance(data, dict):
        data = data.get("endpoints", [])
    if not isinstance(data, list):
        raise ValueError("expected a list of endpoints")
    out: list[Member] = []
    for i, item in enumerate(data):
        http = None
        if isinstance(item, str):
            addr, w = item, 1.0
        elif isinstance(item, dict) and isinstance(item.get("address"), str):
            addr, w, http = item["address"], float(item.get("weight", 1.0)), item.get("http")
        else:
            raise ValueError(f"endpoint [{i}]: expected 'host:port' or {{address, weight, http}}")
        host, sep, port = addr.rpartition(":")
        if not (sep and host and port.isdigit()):
            raise ValueError(f"endpoint [{i}]: expected host:port, got {addr!r}")
        if http is not None and (not isinstance(http, str) or not host_port_ok(http)):
            raise ValueError(f"endpoint [{i}]: http: expected host:port, got {http!r}")
        out.append((addr, w) if http is None else (addr, w, http))
    return out


class FileSource:
    """Polls a JSON/YAML file's mtime and size; reloads it when they change."""

    def __init__(self, pool: Pool, path: str, interval: float, stats: Stats) -> None:
        self.pool, self.path, self.interval, self.stats = pool, Path(path), interval, stats
        self._sig: tuple[float, int] | None = None

    def refresh(self) -> bool:
        """Reload if changed; True when the pool was updated."""
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        sig = (st.st_mtime, st.st_size)
        if sig == self._sig:
            return False
        try:
            text = self.path.read_text()
            data = json.loads(text) if self.path.suffix == ".json" else yaml.safe_load(text)
            eps = parse_endpoint_list(data or [])
        except (OSError, ValueError, yaml.YAMLError) as exc:
            self.stats.count(self.pool.name, "discovery_file_errors")
            log.warning("endpoints file %s: %s (keeping the previous list)", self.path, exc)
            self._sig = sig
            return False
        self._sig = sig
        self.pool.set_source("file", eps)
        self.stats.count(self.pool.name, "discovery_file_reloads")
        return True

    async def run(self) -> None:
        while True:
            self.refresh()
            await asyncio.sleep(self.interval)


class DnsSource:
    """Resolves ``name`` every ``interval`` seconds (a headless Service gives one record per pod)."""

    def __init__(self, pool: Pool, cfg: DnsConfig, stats: Stats, resolver: Any = None) -> None:
        self.pool, self.cfg, self.stats = pool, cfg, stats
        self._resolver = resolver

    async def resolve(self) -> list[str]:
        if self._resolver is not None:
            return list(await self._resolver(self.cfg.name))
        infos = await asyncio.get_running_loop().getaddrinfo(self.cfg.name, self.cfg.port, type=socket.SOCK_STREAM)
        return sorted({str(info[4][0]) for info in infos})

    async def refresh(self) -> bool:
        try:
            ips = await self.resolve()
        except OSError as exc:
            self.stats.count(self.pool.name, "discovery_dns_errors")
            log.warning("resolving %s: %s (keeping the previous list)", self.cfg.name, exc)
            return False
        hp = self.cfg.http_port

        def at(ip: str, port: int) -> str:
            return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"

        eps: list[Member] = [(at(ip, self.cfg.port), 1.0, at(ip, hp) if hp else None) for ip in ips]
        self.pool.set_source("dns", eps)
        return True

    async def run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.cfg.interval)
