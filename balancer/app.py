"""The balancer process: pools, discovery, health checks, the proxy server(s), admin, drain.

Lifecycle reads top to bottom: ``start`` (membership → pools → data plane → checks →
admin), then ``wait`` until a drain finishes, then ``close``. Signal handlers only call
:meth:`begin_drain`.

With ``workers > 1`` this process is the control side only: discovery, active health,
drain and admin live here, and every membership/health/drain change is shipped to
N data-plane worker processes sharing the port with SO_REUSEPORT. Workers send their
counters back once a second for ``/metrics`` and ``/endpoints``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import random
import threading
from typing import Any

from modelyard import tracing
from modelyard.balancer.admin import build_admin_app
from modelyard.balancer.config import BalancerConfig, config_to_dict
from modelyard.balancer.discovery import DnsSource, FileSource
from modelyard.balancer.grpcwire import default_idempotent_methods, default_unary_methods
from modelyard.balancer.guard import StatsCounter
from modelyard.balancer.h2.connection import Flusher
from modelyard.balancer.health import GrpcHealthProbe, HealthChecker
from modelyard.balancer.heap import trim_heap_forever
from modelyard.balancer.metrics import BalancerCollector, Stats, make_registry, merge_dumps
from modelyard.balancer.pool import Pool
from modelyard.balancer.proxy import Proxy
from modelyard.balancer.rest.proxy import RestProxy, http_upstream_factory
from modelyard.balancer.routing import Router
from modelyard.balancer.upstream import Upstream
from modelyard.clock import MONOTONIC, Clock
from modelyard.security.guard import Guard
from modelyard.security.tls import TlsFiles, upstream_grpc_credentials, upstream_ssl_context

log = logging.getLogger("modelyard.balancer")


class Balancer:
    """One balancer process (single, control or worker role)."""

    def __init__(self, cfg: BalancerConfig, *, clock: Clock = MONOTONIC, rng: random.Random | None = None,
                 role: str = "auto") -> None:
        self.cfg = cfg
        self.clock = clock
        self.rng = rng if rng is not None else random.Random()
        if role == "auto":
            role = "control" if cfg.workers > 1 else "single"
        self.role = role
        serves = role in ("single", "worker")
        self.stats = Stats()
        self.router = Router(cfg.routes, random.Random(self.rng.random()))
        self.pools: dict[str, Pool] = {}
        #: one write-coalescing flusher for every connection of this process
        self.flusher = Flusher()
        for name, pcfg in cfg.pools.items():
            h2_tls = upstream_ssl_context(pcfg.tls, ["h2"]) if serves else None
            factory = (lambda a, p=pcfg, t=h2_tls: Upstream(a, p.channels_per_endpoint, self.flusher,
                                                            p.connect_timeout, t, p.tls.server_name)) \
                if serves else None
            # the REST listener's connections to each endpoint's ``http`` address (when there is a listener)
            http_factory = http_upstream_factory(cfg.rest, pcfg.connect_timeout,
                                                 upstream_ssl_context(pcfg.tls, ["http/1.1"]), pcfg.tls.server_name) \
                if serves and cfg.rest.listeners else None
            self.pools[name] = Pool(name, pcfg, clock=clock, rng=random.Random(self.rng.random()), stats=self.stats,
                                    upstream_factory=factory, on_change=self._on_pool_change,
                                    http_upstream_factory=http_factory)
        self.proxy = Proxy(self.router, self.pools, default_unary_methods() | set(cfg.unary_methods),
                           idempotent_methods=default_idempotent_methods() | set(cfg.idempotent_methods),
                           clock=clock, rng=random.Random(self.rng.random()), flusher=self.flusher,
                           max_message_bytes=cfg.max_message_bytes, limits=cfg.limits)
        #: the REST (HTTP/1.1) data plane over the same pools, when ``rest.listeners`` are configured
        self.rest = RestProxy(self.router, self.pools, cfg.rest, clock=clock, rng=random.Random(self.rng.random())) \
            if serves and cfg.rest.listeners else None
        #: admission (tokens, allow lists, rate limits) before routing, on both data planes
        self.guard: Guard | None = None
        if serves and (cfg.auth.enabled or cfg.rate_limit.enabled):
            self.guard = Guard(cfg.auth, cfg.rate_limit, StatsCounter(self.stats))
            self.proxy.guard = self.guard
            if self.rest is not None:
                self.rest.guard = self.guard
        #: the listeners' certificates, watched for changes (new handshakes get the newest)
        self._tls: list[TlsFiles] = []
        self.registry = make_registry(BalancerCollector(self._stats_dump, self.endpoint_rows))
        self.serving = False
        self.ports: list[int] = []
        self.rest_ports: list[int] = []
        self.admin_port: int | None = None
        self.draining = False
        self._drained = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._checkers: dict[str, HealthChecker] = {}
        self._probe = GrpcHealthProbe()
        self._tls_probes: list[GrpcHealthProbe] = []
        self._admin_runner: Any = None
        self._workers: list[tuple[multiprocessing.process.BaseProcess, multiprocessing.connection.Connection]] = []
        self._worker_reports: dict[int, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
        self._push_scheduled = False
        #: the xDS control plane (control or single role, when configured)
        self.xds: Any = None
        self.xds_port: int | None = None

    # ------------------------------------------------------------------ start

    async def start(self) -> None:
        """Load membership, start serving, checks and admin."""
        if self.role != "control":  # the data plane traces (imports OpenTelemetry only when enabled)
            tracing.setup(self.cfg.tracing, "modelyard-balancer")
        if self.role != "worker":
            for name, pool in self.pools.items():
                ep = pool.config.endpoints
                pool.set_source("static", [(s.address, s.weight, s.http) for s in ep.static])
                if ep.file:
                    src = FileSource(pool, ep.file, ep.file_poll_interval, self.stats)
                    src.refresh()
                    self._tasks.append(asyncio.ensure_future(src.run()))
                if ep.dns is not None:
                    dns = DnsSource(pool, ep.dns, self.stats)
                    await dns.refresh()
                    self._tasks.append(asyncio.ensure_future(dns.run()))
                if ep.kubernetes is not None:
                    from modelyard.balancer.k8s import EndpointSliceSource

                    k8s = EndpointSliceSource(pool, ep.kubernetes, self.stats)
                    self._tasks.append(asyncio.ensure_future(k8s.run()))
                hc = pool.config.health_check
                services = [hc.service]
                if hc.per_model:
                    services += self.router.models_for_pool(name)
                probe = self._probe
                if pool.config.tls.on:  # its own channels, over TLS
                    probe = GrpcHealthProbe(upstream_grpc_credentials(pool.config.tls), pool.config.tls.server_name)
                    self._tls_probes.append(probe)
                self._checkers[name] = HealthChecker(pool, probe, self.stats,
                                                     random.Random(self.rng.random()), services)
        for pool in self.pools.values():
            pool.start()
        if self.role in ("single", "worker"):
            await self._start_server(reuseport=self.role == "worker")
        elif self.role == "control":
            await self._start_workers()
        for checker in self._checkers.values():
            checker.sync()
        if self.role != "worker" and self.cfg.admin.address is not None:
            await self._start_admin()
        if self.role != "worker" and self.cfg.xds.address is not None:
            from modelyard.balancer.xds import ControlPlane

            self.xds = ControlPlane(self.cfg, self.pools, self.clock.now)
            self.xds_port = await self.xds.start(self.cfg.xds.address)

    async def _start_server(self, reuseport: bool) -> None:
        self.serving = True
        if self.cfg.tls.enabled:
            h2 = TlsFiles(self.cfg.tls, ["h2"])
            self.proxy.ssl = h2.ssl_context()
            self._tls.append(h2)
            if self.rest is not None:
                http1 = TlsFiles(self.cfg.tls, ["http/1.1"])
                self.rest.ssl = http1.ssl_context()
                self._tls.append(http1)
            for files in self._tls:
                files.start()
        if self.guard is not None:
            self.guard.start()
        for lst in self.cfg.listeners:
            try:
                self.ports.append(await self.proxy.listen(lst.address, reuse_port=reuseport))
            except OSError as exc:
                raise OSError(f"cannot listen on {lst.address}: {exc.strerror or exc}") from exc
        # RSS comes back after a flood of big requests (limits.heap_trim_interval)
        self._tasks.append(asyncio.ensure_future(trim_heap_forever(self.cfg.limits.heap_trim_interval)))
        if self.rest is not None:
            for rl in self.cfg.rest.listeners:
                try:
                    self.rest_ports.append(await self.rest.listen(rl.address, reuse_port=reuseport))
                except OSError as exc:
                    raise OSError(f"cannot listen on {rl.address}: {exc.strerror or exc}") from exc

    async def _start_admin(self) -> None:
        from aiohttp import web

        host, _, port = self.cfg.admin.address.rpartition(":")  # type: ignore[union-attr]
        runner = web.AppRunner(build_admin_app(self), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, int(port))
        await site.start()
        self._admin_runner = runner
        self.admin_port = runner.addresses[0][1]

    # ------------------------------------------------------------------ workers (control side)

    async def _start_workers(self) -> None:
        for lst in [*self.cfg.listeners, *self.cfg.rest.listeners]:
            if lst.address.endswith(":0"):
                raise ValueError("workers > 1 needs fixed listen ports (SO_REUSEPORT), not :0")
        ctx = multiprocessing.get_context("spawn")
        loop = asyncio.get_running_loop()
        for i in range(self.cfg.workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(self.cfg, child, i), name=f"balancer-worker-{i}", daemon=True)
            proc.start()
            child.close()
            parent.send(("state", self._control_state()))
            self._workers.append((proc, parent))
            threading.Thread(target=self._read_worker, args=(loop, i, parent), daemon=True).start()
        self.ports = [int(lst.address.rpartition(":")[2]) for lst in self.cfg.listeners]
        self.rest_ports = [int(rl.address.rpartition(":")[2]) for rl in self.cfg.rest.listeners]
        # wait until every worker listens
        ready = [asyncio.get_running_loop().create_future() for _ in self._workers]
        self._ready_futs = ready
        await asyncio.wait_for(asyncio.gather(*ready), 30)

    def _read_worker(self, loop: asyncio.AbstractEventLoop, i: int, conn: multiprocessing.connection.Connection) -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return
            loop.call_soon_threadsafe(self._on_worker_msg, i, msg)

    def _on_worker_msg(self, i: int, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "ready":
            fut = self._ready_futs[i]
            if not fut.done():
                fut.set_result(None)
        elif kind == "stats":
            self._worker_reports[i] = (msg[1], msg[2])
            for name, n in msg[1].get("held", {}).items():
                if n and name in self.pools:
                    self.pools[name].notify_demand()

    def _control_state(self) -> dict[str, Any]:
        return {name: pool.control_state() for name, pool in self.pools.items()}

    def _on_pool_change(self, pool: Pool) -> None:
        if self.xds is not None:
            self.xds.changed()
        checker = self._checkers.get(pool.name)
        if checker is not None:
            with contextlib.suppress(RuntimeError):
                checker.sync()
        if self._workers and not self._push_scheduled:
            self._push_scheduled = True
            asyncio.get_running_loop().call_soon(self._push_state)

    def _push_state(self) -> None:
        self._push_scheduled = False
        state = self._control_state()
        for _, conn in self._workers:
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send(("state", state))

    # ------------------------------------------------------------------ views

    def _stats_dump(self) -> dict[str, Any]:
        dumps = [self.stats.dump()] + [r[0] for r in self._worker_reports.values()]
        return merge_dumps(dumps)

    def endpoint_rows(self) -> list[dict[str, Any]]:
        """Per-endpoint state; in worker mode, load counters summed over workers."""
        rows = [r for pool in self.pools.values() for r in pool.describe()]
        if not self._worker_reports:
            return rows
        by_key = {(r["pool"], r["address"]): r for r in rows}
        for r in rows:
            r.update(outstanding=0, requests=0, failures=0, times_ejected=0, ewma_ms=None, ejected=False)
        for _, wrows in self._worker_reports.values():
            for w in wrows:
                r = by_key.get((w["pool"], w["address"]))
                if r is None:
                    continue
                for k in ("outstanding", "requests", "failures", "times_ejected"):
                    r[k] += w[k]
                r["ejected"] = r["ejected"] or w["ejected"]
                if w["ewma_ms"] is not None:
                    r["ewma_ms"] = max(r["ewma_ms"] or 0.0, w["ewma_ms"])
        return rows

    def held(self, pool: str) -> int:
        """Requests held now for ``pool`` (in worker mode: as last reported by the workers)."""
        own = len(self.pools[pool].held) if pool in self.pools else 0
        return own + sum(r[0].get("held", {}).get(pool, 0) for r in self._worker_reports.values())

    def config_dict(self) -> dict[str, Any]:
        return config_to_dict(self.cfg)

    # ------------------------------------------------------------------ drain / stop

    def begin_drain(self) -> None:
        """Start draining (idempotent): health NOT_SERVING, stop accepting, finish in-flight, then exit."""
        if self.draining:
            return
        self.draining = True
        self.proxy.draining = True
        asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        for _, conn in self._workers:
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send(("drain",))
        await asyncio.sleep(self.cfg.drain.delay)
        if self.serving:
            grace = self.cfg.drain.grace
            await asyncio.gather(self.proxy.shutdown(grace), *([self.rest.shutdown(grace)] if self.rest else []))
        for proc, _ in self._workers:
            await asyncio.get_running_loop().run_in_executor(None, proc.join, self.cfg.drain.grace + 5)
        self._drained.set()

    async def wait(self) -> None:
        """Return once a drain has finished."""
        await self._drained.wait()

    async def __aenter__(self) -> Balancer:
        """Start (closing again if starting fails); ``async with Balancer(cfg) as b`` closes on exit."""
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop everything now (after a drain, or in tests)."""
        for t in self._tasks:
            t.cancel()
        for checker in self._checkers.values():
            await checker.close()
        if self.serving:
            await self.proxy.shutdown(0)
            if self.rest is not None:
                await self.rest.shutdown(0)
        for proc, conn in self._workers:
            with contextlib.suppress(OSError):
                conn.close()
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        if self.xds is not None:
            await self.xds.close()
        for pool in self.pools.values():
            await pool.close()
        for probe in (self._probe, *self._tls_probes):
            await probe.close()
        for files in self._tls:
            files.close()
        if self.guard is not None:
            self.guard.close()
        if self.role != "control" and self.cfg.tracing.enabled:
            await asyncio.to_thread(tracing.shutdown)  # the last spans are exported


def worker_main(cfg: BalancerConfig, conn: multiprocessing.connection.Connection, index: int) -> None:
    """Entry point of a data-plane worker process."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the control process decides when to stop
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_worker(cfg, conn))


async def _worker(cfg: BalancerConfig, conn: multiprocessing.connection.Connection) -> None:
    b = Balancer(cfg, role="worker")
    loop = asyncio.get_running_loop()
    first_state: asyncio.Future[None] = loop.create_future()

    def apply(msg: tuple[str, Any]) -> None:
        if msg[0] == "state":
            for name, rows in msg[1].items():
                b.pools[name].apply_control_state(rows)
            if not first_state.done():
                first_state.set_result(None)
        elif msg[0] == "drain":
            b.begin_drain()

    def reader() -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                loop.call_soon_threadsafe(b.begin_drain)
                return
            loop.call_soon_threadsafe(apply, msg)

    threading.Thread(target=reader, daemon=True).start()
    await first_state
    await b.start()
    conn.send(("ready",))

    async def report() -> None:
        while True:
            await asyncio.sleep(1.0)
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send(("stats", b.stats.dump(), b.endpoint_rows()))

    reporter = asyncio.ensure_future(report())
    await b.wait()
    reporter.cancel()
    await b.close()
