"""The ``local`` actuator (the embedded default): replicas are ``modelyard serve`` processes on this host.

Scale up: start ``modelyard serve`` on free loopback ports (:mod:`modelyard.launcher`), wait for its
ready line and for grpc.health.v1 SERVING, then add it to the balancer's pool (admin API, with its HTTP
address for the balancer's REST listener) -- a
replica takes traffic only once it can answer. Scale down: drain it in the balancer (no new picks),
wait until the balancer has no request in flight to it, remove it, then SIGTERM it (the server
finishes anything it still holds). No request fails because of a scale step.

A replica that does not become healthy within ``start_timeout`` is killed and counted
(``failed_starts``); starts are retried after ``restart_backoff`` seconds, and other replicas are
never blocked by it (every start and stop is its own task).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from modelyard.balancer.admin import AdminClient
from modelyard.config import Check
from modelyard.launcher import ServerProcess

log = logging.getLogger("modelyard.autoscaler")

STARTING, READY, DRAINING, STOPPING = "starting", "ready", "draining", "stopping"


@dataclass
class LocalConfig:
    """How a pool's replicas are started on this host."""

    #: model repository the replicas serve (empty = the built-in demo models)
    model_repository: str = ""
    #: models each replica loads (``--model``; empty = every model in the repository)
    models: list[str] = field(default_factory=list)
    #: more ``modelyard serve`` arguments
    serve_args: list[str] = field(default_factory=list)
    #: the balancer's admin address (host:port) the replicas are added to
    balancer_admin: str = "127.0.0.1:9901"
    #: the pool's name in the balancer (default: the autoscaler pool's name)
    balancer_pool: str = ""
    #: seconds a replica may take to become healthy before it is killed
    start_timeout: float = 60.0
    #: seconds to wait for a draining replica's requests before stopping it anyway
    drain_timeout: float = 30.0
    #: seconds between a failed start and the next try
    restart_backoff: float = 2.0
    #: seconds a stopping replica gets to exit after SIGTERM
    stop_grace: float = 30.0

    def validate(self, check: Check) -> None:
        check(bool(self.balancer_admin), "balancer_admin", "is required (host:port of the balancer's admin API)")
        for key in ("start_timeout", "drain_timeout", "stop_grace"):
            check(getattr(self, key) > 0, key, "must be > 0")
        check(self.restart_backoff >= 0, "restart_backoff", "must be >= 0")


@dataclass(eq=False)
class Replica:
    """One ``modelyard serve`` process and where it is in its life."""

    name: str
    state: str = STARTING
    process: ServerProcess | None = None
    grpc: str = ""
    http: str = ""
    started_at: float = 0.0
    ready_at: float | None = None
    task: asyncio.Task[Any] | None = None
    #: where the start time went (s): until the ready line, until SERVING, until added to the balancer;
    #: and the model load and warmup the replica reported (inside the first)
    timings: dict[str, float] = field(default_factory=dict)

    def view(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "grpc": self.grpc, "http": self.http,
                "pid": self.process.pid if self.process else None,
                "start_s": round(self.ready_at - self.started_at, 2) if self.ready_at else None,
                "timings": {k: round(v, 3) for k, v in self.timings.items()}}


async def wait_serving(address: str, deadline: float) -> None:
    """Poll grpc.health.v1 Check("") on ``address`` until SERVING; TimeoutError at ``deadline`` (monotonic)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{address} is not SERVING")
            with contextlib.suppress(grpc.aio.AioRpcError):
                r = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=min(1.0, left))
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(0.05)


async def model_load_timings(http: str) -> dict[str, float]:
    """``model_load_s`` and ``warmup_s`` (summed over models) from a replica's /metrics."""
    import aiohttp

    from modelyard.autoscaler.metrics import parse_metrics, total

    async with aiohttp.ClientSession() as s, s.get(f"http://{http}/metrics",
                                                   timeout=aiohttp.ClientTimeout(total=2)) as r:
        page = parse_metrics(await r.text())
    return {"model_load_s": total(page, "modelyard_model_load_seconds"),
            "warmup_s": total(page, "modelyard_model_warmup_seconds")}


class LocalActuator:
    """Keeps ``desired`` replicas of one pool running as local processes behind the balancer."""

    kind = "local"

    def __init__(self, pool: str, config: LocalConfig, *, on_event: Callable[[str], None] | None = None) -> None:
        self.pool = pool
        self.config = config
        self.balancer_pool = config.balancer_pool or pool
        self.admin = AdminClient(config.balancer_admin)
        self.replicas: list[Replica] = []
        self.desired = 0
        self.failed_starts = 0
        self.on_event = on_event or (lambda text: None)
        self._names = itertools.count(1)
        self._retry_at = 0.0
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._closed = False

    # ------------------------------------------------------------------ views

    def counts(self) -> tuple[int, int]:
        """(replicas asked for and on their way or serving, replicas serving)."""
        live = sum(1 for r in self.replicas if r.state in (STARTING, READY))
        return live, sum(1 for r in self.replicas if r.state == READY)

    def metrics_urls(self) -> list[str]:
        """HTTP bases of the serving replicas (their ``/metrics``)."""
        return [f"http://{r.http}" for r in self.replicas if r.state == READY and r.http]

    def view(self) -> list[dict[str, Any]]:
        return [r.view() for r in self.replicas]

    # ------------------------------------------------------------------ control

    async def start(self) -> None:
        self._loop_task = asyncio.ensure_future(self._run())

    async def scale(self, desired: int, reason: str = "") -> None:
        """Converge towards ``desired`` replicas (returns at once; the work happens in the background)."""
        self.desired = max(0, desired)
        self._wake.set()

    async def _run(self) -> None:
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            self._reconcile()

    def _reconcile(self) -> None:
        live = [r for r in self.replicas if r.state in (STARTING, READY)]
        now = time.monotonic()
        if self.desired > len(live):
            if now < self._retry_at:
                asyncio.get_running_loop().call_later(self._retry_at - now, self._wake.set)
                return
            for _ in range(self.desired - len(live)):
                r = Replica(f"{self.pool}-{next(self._names)}", started_at=now)
                self.replicas.append(r)
                r.task = asyncio.ensure_future(self._start(r))
        elif self.desired < len(live):
            # starting ones first (they serve nobody yet), then the newest serving ones
            newest_first = sorted(live, key=lambda r: r.started_at, reverse=True)
            victims = [r for r in newest_first if r.state == STARTING] + [r for r in newest_first if r.state == READY]
            for r in victims[:len(live) - self.desired]:
                if r.state == STARTING:
                    r.state = STOPPING
                    if r.task is not None and not r.task.done():
                        r.task.cancel()  # its start kills the process on the way out
                    else:
                        r.task = asyncio.ensure_future(self._kill(r))
                else:
                    r.state = DRAINING
                    r.task = asyncio.ensure_future(self._stop(r))

    # ------------------------------------------------------------------ one replica

    def _argv(self) -> list[str]:
        cfg = self.config
        args = ["--log-level", "warning"]
        if cfg.model_repository:
            args += ["--model-repository", cfg.model_repository]
        for m in cfg.models:
            args += ["--model", m]
        return [*args, *cfg.serve_args]

    async def _start(self, r: Replica) -> None:
        cfg = self.config
        proc = ServerProcess(self._argv(), start_timeout=cfg.start_timeout, name=r.name)
        r.process = proc
        loop = asyncio.get_running_loop()
        try:
            endpoints = await loop.run_in_executor(None, proc.start)
            assert endpoints is not None
            r.grpc, r.http = endpoints.grpc, endpoints.http
            r.timings["ready_line_s"] = time.monotonic() - r.started_at
            await wait_serving(r.grpc, r.started_at + cfg.start_timeout)
            r.timings["serving_s"] = time.monotonic() - r.started_at
            await self.admin.add(self.balancer_pool, r.grpc, http=r.http or None)
            r.timings["added_s"] = time.monotonic() - r.started_at
        except asyncio.CancelledError:
            if r.grpc:  # it may have been added just now
                with contextlib.suppress(Exception):
                    await self.admin.remove(self.balancer_pool, r.grpc)
            await self._kill(r)
            raise
        except Exception as exc:  # never healthy, crashed, balancer refused: kill it, count it, retry later
            self.failed_starts += 1
            self._retry_at = time.monotonic() + cfg.restart_backoff
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.warning("pool %s: replica %s failed to start (%s); killed", self.pool, r.name, reason)
            self.on_event(f"{r.name} failed to start: {reason}")
            r.state = STOPPING
            await self._kill(r)
            self._wake.set()
            return
        if r.state != STARTING:  # scaled down while it was starting
            return
        r.state = READY
        r.ready_at = time.monotonic()
        with contextlib.suppress(Exception):  # the replica's own account of its model load and warmup
            r.timings.update(await model_load_timings(r.http))
        log.info("pool %s: replica %s ready at %s (%.2fs)", self.pool, r.name, r.grpc, r.ready_at - r.started_at)
        self.on_event(f"{r.name} ready in {r.ready_at - r.started_at:.1f}s")

    async def _stop(self, r: Replica) -> None:
        """Drain in the balancer, wait for its in-flight requests, remove, SIGTERM."""
        cfg = self.config
        try:
            await self.admin.drain(self.balancer_pool, r.grpc)
            deadline = time.monotonic() + cfg.drain_timeout
            while time.monotonic() < deadline:
                rows = [e for e in await self.admin.endpoints()
                        if e["pool"] == self.balancer_pool and e["address"] == r.grpc]
                if not rows or rows[0]["outstanding"] == 0:
                    break
                await asyncio.sleep(0.05)
            await self.admin.remove(self.balancer_pool, r.grpc)
        except Exception as exc:  # the balancer is gone or refused: stop the replica anyway
            log.warning("pool %s: draining %s in the balancer failed: %s", self.pool, r.name, exc)
        r.state = STOPPING
        self.on_event(f"{r.name} drained, stopping")
        await self._kill(r, graceful=True)

    async def _kill(self, r: Replica, graceful: bool = False) -> None:
        proc = r.process
        if proc is not None:
            timeout = self.config.stop_grace if graceful else 0.0
            await asyncio.get_running_loop().run_in_executor(None, proc.stop, timeout)
        with contextlib.suppress(ValueError):
            self.replicas.remove(r)

    async def close(self, stop_replicas: bool = True) -> None:
        """Stop reconciling; with ``stop_replicas`` SIGTERM every replica, else leave them serving."""
        self._closed = True
        if self._loop_task is not None:
            self._loop_task.cancel()
        for r in list(self.replicas):
            if r.task is not None and not r.task.done():
                r.task.cancel()
        if stop_replicas:
            await asyncio.gather(*(self._kill(r, graceful=True) for r in list(self.replicas)),
                                 return_exceptions=True)
        else:
            for r in self.replicas:
                if r.process is not None:
                    r.process.detach()
        await self.admin.close()
