"""Active health checking with grpc.health.v1 (Envoy's thresholds).

One task per endpoint calls ``Health/Check`` every ``interval`` (first check at a
random offset within the interval so checks do not synchronise), for the service
name ``""`` or the configured one, and for each model routed to the pool when
``per_model`` is set. ``unhealthy_threshold`` failures in a row mark the endpoint
UNHEALTHY; ``healthy_threshold`` successes in a row mark it HEALTHY again.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from modelyard.balancer.endpoint import Health
from modelyard.balancer.metrics import Stats
from modelyard.balancer.pool import Pool

#: (address, service, timeout) -> True when SERVING
CheckFn = Callable[[str, str, float], Awaitable[bool]]


class GrpcHealthProbe:
    """Calls grpc.health.v1 Check over one channel per address (separate from data channels)."""

    def __init__(self, credentials: grpc.ChannelCredentials | None = None, server_name: str = "") -> None:
        #: TLS to the endpoints (a pool with ``tls``), and the name their certificates are checked against
        self.credentials = credentials
        self.server_name = server_name
        self._channels: dict[str, grpc.aio.Channel] = {}
        #: health checkers (one per pool) currently checking each address; shared probe, so counted
        self._users: dict[str, int] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def acquire(self, address: str) -> None:
        """A checker starts checking ``address``."""
        self._users[address] = self._users.get(address, 0) + 1

    def release(self, address: str) -> None:
        """A checker stopped checking ``address``; its channel closes when nobody checks it any more
        (endpoints churn with DNS / Kubernetes: old addresses must not keep reconnecting forever)."""
        n = self._users.get(address, 0) - 1
        if n > 0:
            self._users[address] = n
            return
        self._users.pop(address, None)
        task = asyncio.ensure_future(self.forget(address))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def __call__(self, address: str, service: str, timeout: float) -> bool:  # noqa: ASYNC109
        ch = self._channels.get(address)
        if ch is None:
            options: list[tuple[str, Any]] = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_reconnect_backoff_ms", 1000),
                       ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100)]
            if self.credentials is None:
                ch = grpc.aio.insecure_channel(address, options=options)
            else:
                if self.server_name:
                    options.append(("grpc.ssl_target_name_override", self.server_name))
                ch = grpc.aio.secure_channel(address, self.credentials, options=options)
            self._channels[address] = ch
        check = ch.unary_unary("/grpc.health.v1.Health/Check",
                               request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                               response_deserializer=health_pb2.HealthCheckResponse.FromString)
        try:
            resp = await check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        return resp.status == health_pb2.HealthCheckResponse.SERVING

    async def forget(self, address: str) -> None:
        ch = self._channels.pop(address, None)
        if ch is not None:
            await ch.close(None)

    async def close(self) -> None:
        for addr in list(self._channels):
            await self.forget(addr)


class HealthChecker:
    """Keeps one check loop per endpoint of a pool, following membership changes."""

    def __init__(self, pool: Pool, probe: CheckFn, stats: Stats, rng: random.Random | None = None,
                 services: list[str] | None = None) -> None:
        self.pool = pool
        self.probe = probe
        self.stats = stats
        self.rng = rng if rng is not None else random.Random()
        cfg = pool.config.health_check
        self.services = services if services is not None else [cfg.service]
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._streak: dict[str, int] = {}

    def sync(self) -> None:
        """Start loops for new endpoints, stop those of removed ones."""
        if not self.pool.config.health_check.enabled:
            return
        current = set(self.pool.endpoints)
        release = getattr(self.probe, "release", None)
        acquire = getattr(self.probe, "acquire", None)
        for addr in list(self._tasks):
            if addr not in current:
                self._tasks.pop(addr).cancel()
                self._streak.pop(addr, None)  # a re-added address starts afresh
                if release is not None:
                    release(addr)
        for addr in current - set(self._tasks):
            if acquire is not None:
                acquire(addr)
            self._tasks[addr] = asyncio.ensure_future(self._loop(addr))

    async def check_once(self, address: str) -> bool:
        """Run the checks for ``address`` once and apply thresholds; returns the probe result."""
        cfg = self.pool.config.health_check
        ok = True
        for svc in self.services:
            if not await self.probe(address, svc, cfg.timeout):
                ok = False
                break
        self.stats.count(self.pool.name, "hc_success" if ok else "hc_failure")
        # streak > 0 counts successes, < 0 failures
        s = self._streak.get(address, 0)
        s = (s + 1 if s > 0 else 1) if ok else (s - 1 if s < 0 else -1)
        self._streak[address] = s
        ep = self.pool.endpoints.get(address)
        if ep is not None:
            if ok and s >= cfg.healthy_threshold and ep.health is not Health.HEALTHY:
                self.pool.set_health(address, Health.HEALTHY)
            elif not ok and -s >= cfg.unhealthy_threshold and ep.health is not Health.UNHEALTHY:
                self.stats.count(self.pool.name, "hc_marked_unhealthy")
                self.pool.set_health(address, Health.UNHEALTHY)
        return ok

    async def _loop(self, address: str) -> None:
        cfg = self.pool.config.health_check
        await asyncio.sleep(self.rng.uniform(0, min(cfg.interval, 0.2)))
        while True:
            await self.check_once(address)
            await asyncio.sleep(cfg.interval)

    async def close(self) -> None:
        for t in self._tasks.values():
            t.cancel()
        for t in self._tasks.values():
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
