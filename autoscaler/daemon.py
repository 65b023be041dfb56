"""The autoscaler daemon: every tick, per pool, gather a sample, ask the policy, tell the actuator.

No arithmetic here (that is :mod:`modelyard.autoscaler.policy`) and no process or API handling
(that is the actuators'). What this module adds: the tick loop, the activation long-poll (a pool
at zero replicas is woken as soon as the balancer holds a request for it, not at the next tick),
one log line per decision that changes something (with its reason), a log line per change of
metrics-source state (not one per tick), the daemon's own ``/metrics`` and ``/status``, and the
stop: on SIGTERM the loop ends and the replicas are left as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from modelyard.autoscaler.actuators import Actuator
from modelyard.autoscaler.config import AutoscaleConfig, PoolScaling
from modelyard.autoscaler.metrics import MetricsSource, Reading
from modelyard.autoscaler.policy import Decision, Policy, Sample

log = logging.getLogger("modelyard.autoscaler")

#: decisions kept per pool for /status and the terminal view
KEEP_DECISIONS = 20


def build_actuator(name: str, scaling: PoolScaling, on_event: Any = None) -> Actuator:
    """The actuator a pool's config asks for."""
    act = scaling.actuator
    if act.kind == "kubernetes":
        from modelyard.autoscaler.actuators.kubernetes import KubernetesActuator

        assert act.kubernetes is not None
        return KubernetesActuator(name, act.kubernetes, on_event=on_event)
    from modelyard.autoscaler.actuators.local import LocalActuator

    return LocalActuator(name, act.local, on_event=on_event)


class DaemonMetrics:
    """The daemon's own Prometheus metrics (its own registry, never the global one)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.desired = Gauge("modelyard_autoscaler_desired_replicas", "Replicas the policy wants", ["pool"], registry=r)
        self.replicas = Gauge("modelyard_autoscaler_replicas", "Replicas asked of the actuator", ["pool"], registry=r)
        self.ready = Gauge("modelyard_autoscaler_ready_replicas", "Replicas serving", ["pool"], registry=r)
        self.panic = Gauge("modelyard_autoscaler_panic", "1 while the pool is in panic mode", ["pool"], registry=r)
        self.observed = Gauge("modelyard_autoscaler_observed_load",
                              "Stable-window load the decision used (the mode's unit)", ["pool", "mode"], registry=r)
        self.decisions = Counter("modelyard_autoscaler_decisions", "Decisions by kind", ["pool", "kind"], registry=r)
        self.failed_starts = Gauge("modelyard_autoscaler_failed_starts", "Replicas that never became healthy",
                                   ["pool"], registry=r)
        self.metrics_missing = Gauge("modelyard_autoscaler_metrics_missing",
                                     "Metrics sources that did not answer at the last tick", ["pool"], registry=r)


@dataclass
class PoolRunner:
    """One pool's loop state."""

    name: str
    scaling: PoolScaling
    policy: Policy
    source: MetricsSource
    actuator: Actuator
    samples: deque[Sample] = field(default_factory=deque)
    decisions: deque[tuple[float, Decision]] = field(default_factory=lambda: deque(maxlen=KEEP_DECISIONS))
    events: deque[tuple[float, str]] = field(default_factory=lambda: deque(maxlen=KEEP_DECISIONS))
    last: Decision | None = None
    reading: Reading | None = None
    missing_state: tuple[str, ...] = ()
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def event(self, text: str) -> None:
        self.events.append((time.time(), text))


class Autoscaler:
    """Runs every pool's tick loop until :meth:`stop`."""

    def __init__(self, config: AutoscaleConfig) -> None:
        self.config = config
        self.metrics = DaemonMetrics()
        self.pools: dict[str, PoolRunner] = {}
        for name, scaling in config.pools.items():
            runner = PoolRunner(name, scaling, Policy(scaling.policy), MetricsSource(name, scaling.source),
                                actuator=None)  # type: ignore[arg-type]
            runner.actuator = build_actuator(name, scaling, on_event=runner.event)
            self.pools[name] = runner
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._admin: Any = None
        self.admin_port: int | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        for runner in self.pools.values():
            await runner.actuator.start()
            # start at the floor the policy allows, before any metric exists
            p = runner.scaling.policy
            await runner.actuator.scale(max(p.min_replicas, 0 if p.scale_to_zero else 1))
        self._tasks.append(asyncio.ensure_future(self._loop()))
        for runner in self.pools.values():
            if runner.scaling.source.balancer_admin and runner.scaling.policy.scale_to_zero:
                self._tasks.append(asyncio.ensure_future(self._activation(runner)))
        if self.config.admin is not None:
            await self._start_admin(self.config.admin)

    async def _loop(self) -> None:
        tick = self.config.tick
        next_at = time.monotonic()
        while not self._stop.is_set():
            await asyncio.gather(*(self.tick(r) for r in self.pools.values()), return_exceptions=True)
            next_at += tick
            delay = next_at - time.monotonic()
            if delay < 0:  # a slow tick: do not try to catch up
                next_at, delay = time.monotonic(), 0.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)

    async def tick(self, runner: PoolRunner, now: float | None = None) -> Decision:
        """One decision for one pool (also called by the activation loop, out of turn)."""
        async with runner.lock:
            try:
                return await self._tick(runner, time.monotonic() if now is None else now)
            except Exception:  # one bad tick must never end the loop
                log.exception("pool %s: tick failed", runner.name)
                raise

    async def _tick(self, runner: PoolRunner, now: float) -> Decision:
        name, act, m = runner.name, runner.actuator, self.metrics
        replicas, ready = act.counts()
        reading = await runner.source.read(now, ready, act.metrics_urls())
        runner.reading = reading
        self._report_missing(runner, reading, ready)
        runner.samples.append(runner.source.sample(reading, now, replicas, ready))
        horizon = now - runner.scaling.policy.stable_window - 2 * self.config.tick
        while runner.samples and runner.samples[0].time < horizon:
            runner.samples.popleft()
        decision = runner.policy.decide(list(runner.samples), now)
        previous = runner.last
        runner.last = decision
        mode = runner.scaling.policy.mode
        m.desired.labels(name).set(decision.desired)
        m.replicas.labels(name).set(replicas)
        m.ready.labels(name).set(ready)
        m.panic.labels(name).set(1 if decision.panic else 0)
        m.decisions.labels(name, decision.kind).inc()
        if decision.observed is not None:
            m.observed.labels(name, mode).set(decision.observed)
        failed = getattr(act, "failed_starts", None)
        if failed is not None:
            m.failed_starts.labels(name).set(failed)
        changed = decision.desired != replicas
        if changed or (previous is not None and previous.panic != decision.panic):
            runner.decisions.append((time.time(), decision))
            log.info("pool %s: %s replicas %d -> %d (ready %d): %s", name, decision.kind, replicas,
                     decision.desired, ready, decision.reason)
            runner.event(f"{decision.kind}: {replicas} -> {decision.desired}")
        if changed:
            await act.scale(decision.desired, decision.reason)
        return decision

    def _report_missing(self, runner: PoolRunner, reading: Reading, ready: int) -> None:
        """Log once per change of which sources are missing (never once per tick)."""
        state = tuple(sorted(m.split(":", 1)[0] for m in reading.missing))
        self.metrics.metrics_missing.labels(runner.name).set(len(state))
        if state == runner.missing_state:
            return
        if state:
            log.warning("pool %s: metrics source(s) not answering: %s", runner.name, "; ".join(reading.missing))
            runner.event(f"metrics missing: {', '.join(state)}")
        else:
            log.info("pool %s: every metrics source answers again", runner.name)
            runner.event("metrics back")
        runner.missing_state = state

    async def _activation(self, runner: PoolRunner) -> None:
        """Scale from zero at once: wait on the balancer's demand long-poll while the pool is at zero."""
        from modelyard.balancer.admin import AdminClient

        src = runner.scaling.source
        admin = AdminClient(src.balancer_admin)
        try:
            while not self._stop.is_set():
                replicas, _ = runner.actuator.counts()
                try:
                    demand = await admin.demand(runner.source.balancer_pool, 10.0 if replicas == 0 else 1.0)
                except Exception:  # the balancer is not up (yet): the tick loop reports sources
                    await asyncio.sleep(1.0)
                    continue
                if demand.get("held") and runner.actuator.counts()[0] == 0:
                    log.info("pool %s: %d request(s) held at zero replicas: activating", runner.name, demand["held"])
                    with contextlib.suppress(Exception):
                        await self.tick(runner)
                    await asyncio.sleep(0.2)
                elif replicas:
                    await asyncio.sleep(1.0)
        finally:
            await admin.close()

    async def _start_admin(self, address: str) -> None:
        from aiohttp import web

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(body=generate_latest(self.metrics.registry),
                                headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

        async def status(_: web.Request) -> web.Response:
            return web.json_response(self.status())

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/status", status)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        host, _, port = address.rpartition(":")
        await web.TCPSite(runner, host, int(port)).start()
        self._admin = runner
        self.admin_port = runner.addresses[0][1]

    def status(self) -> dict[str, Any]:
        """Per pool: replicas, the last decision and reading, recent decisions and events (JSON)."""
        out: dict[str, Any] = {}
        for name, r in self.pools.items():
            replicas, ready = r.actuator.counts()
            d = r.last
            rd = r.reading
            out[name] = {
                "replicas": replicas, "ready": ready, "mode": r.scaling.policy.mode,
                "desired": d.desired if d else None, "panic": d.panic if d else False,
                "reason": d.reason if d else "", "kind": d.kind if d else "",
                "load": {"rps": rd.rps, "concurrency": rd.concurrency, "queue": rd.queue, "p50_ms": rd.p50_ms,
                         "p99_ms": rd.p99_ms,
                         "held": rd.held, "missing": rd.missing} if rd else {},
                "replica_list": r.actuator.view(),
                "decisions": [{"time": t, "desired": x.desired, "kind": x.kind, "reason": x.reason}
                              for t, x in r.decisions],
                "events": [{"time": t, "text": x} for t, x in r.events],
            }
        return out

    def stop(self) -> None:
        """Signal-safe: end the loops (replicas are left as they are unless :meth:`close` is told otherwise)."""
        self._stop.set()

    async def wait(self) -> None:
        await self._stop.wait()

    async def close(self, stop_replicas: bool = False) -> None:
        self._stop.set()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for r in self.pools.values():
            await r.actuator.close(stop_replicas=stop_replicas)
            await r.source.close()
        if self._admin is not None:
            await self._admin.cleanup()
