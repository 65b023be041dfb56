"""A pool: endpoints from every discovery source, their health / drain / ejection state,
a picker, and the immutable :class:`Snapshot` the picker chooses from.

State changes (membership, health, drain, ejection, slow-start steps) rebuild the
snapshot; picking only reads ``pool.snapshot``. Endpoints removed while requests
are in flight keep their connections until those requests finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Iterable
from typing import Any

from modelyard.balancer.config import PoolConfig
from modelyard.balancer.endpoint import Endpoint, Entry, Health, Member, Outcome, Snapshot
from modelyard.balancer.metrics import Stats
from modelyard.balancer.outlier import OutlierDetector
from modelyard.balancer.pickers import PICKERS
from modelyard.balancer.rest.upstream import HttpUpstream
from modelyard.balancer.retry import RetryBudget
from modelyard.balancer.upstream import Upstream
from modelyard.clock import MONOTONIC, Clock

#: makes the per-endpoint connection object; None = no data-plane connections (control process)
UpstreamFactory = Callable[[str], Upstream]
#: makes an endpoint's HTTP/1.1 connections from its ``http`` address; None = no REST data plane
HttpUpstreamFactory = Callable[[str], HttpUpstream]


class Pool:
    """Endpoint membership + state for one pool, and the data-plane counters that guard it."""

    def __init__(
        self,
        name: str,
        config: PoolConfig,
        *,
        clock: Clock = MONOTONIC,
        rng: random.Random | None = None,
        stats: Stats | None = None,
        upstream_factory: UpstreamFactory | None = None,
        on_change: Callable[[Pool], None] | None = None,
        http_upstream_factory: HttpUpstreamFactory | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.clock = clock
        self.rng = rng if rng is not None else random.Random()
        self.stats = stats if stats is not None else Stats()
        self.picker = PICKERS[config.picker](clock=clock, rng=self.rng, **config.picker_options)
        self.outlier = OutlierDetector(config.outlier_detection)
        self.budget = RetryBudget(config.retry, clock)
        self.upstream_factory = upstream_factory
        self.http_upstream_factory = http_upstream_factory
        self.on_change = on_change
        #: address -> endpoint
        self.endpoints: dict[str, Endpoint] = {}
        #: source -> {address: (weight, http address)}; an endpoint exists while any source lists it
        self._sources: dict[str, dict[str, tuple[float, str | None]]] = {}
        self._retired: list[Endpoint] = []
        self.snapshot = Snapshot(name, ())
        #: the snapshot's endpoints that have an HTTP address (the REST relay picks from it); the very
        #: same object as ``snapshot`` when all of them do, so pickers see one snapshot
        self.http_snapshot = self.snapshot
        self._version = 0
        self._timer: asyncio.TimerHandle | None = None
        self._started = False
        #: in-flight counters for circuit breaking
        self.active = 0
        self.pending = 0
        self.active_retries = 0
        self.checked_services: list[str] = []
        self._closing: set[asyncio.Task[None]] = set()
        #: calls held while the pool has no endpoint (activator), with their timeout timers
        self.held: dict[Any, asyncio.TimerHandle] = {}
        #: called (soon) when endpoints appear while calls are held: the proxy sends them
        self.on_ready: Callable[[], None] | None = None
        #: more such callbacks (the REST relay's)
        self.ready_listeners: list[Callable[[], None]] = []
        #: futures of admin requests waiting for demand (held calls)
        self._demand_waiters: list[asyncio.Future[None]] = []

    # ------------------------------------------------------------------ membership

    def set_source(self, source: str, endpoints: Iterable[Member]) -> None:
        """Replace everything ``source`` says about this pool (static, file, dns, kubernetes, admin):
        ``(address, weight)`` or ``(address, weight, http_address)`` entries."""
        self._sources[source] = {m[0]: (m[1], m[2] if len(m) > 2 else None) for m in endpoints}  # type: ignore[misc]
        self._reconcile()

    def add(self, address: str, weight: float = 1.0, source: str = "admin", http: str | None = None) -> None:
        self._sources.setdefault(source, {})[address] = (weight, http)
        self._reconcile()

    def remove(self, address: str) -> bool:
        """Remove ``address`` from every source; False when it was not there."""
        found = False
        for eps in self._sources.values():
            found = eps.pop(address, None) is not None or found
        self._reconcile()
        return found

    def _reconcile(self) -> None:
        wanted: dict[str, tuple[float, str, str | None]] = {}
        for source, eps in self._sources.items():
            for addr, (w, http) in eps.items():
                have = wanted.setdefault(addr, (w, source, http))
                if have[2] is None and http is not None:  # any source may know the HTTP address
                    wanted[addr] = (have[0], have[1], http)
        now = self.clock.now()
        for addr in list(self.endpoints):
            if addr not in wanted:
                self._retire(self.endpoints.pop(addr))
        for addr, (w, source, http) in wanted.items():
            ep = self.endpoints.get(addr)
            if ep is None:
                # endpoints known at start are not slow-started; later ones are
                ep = Endpoint(addr, weight=w, source=source, added_at=now if self._started else float("-inf"))
                if self.upstream_factory is not None:
                    ep.upstream = self.upstream_factory(addr)
                self.endpoints[addr] = ep
            else:
                ep.weight = w
            if ep.http != http:
                self._close_http(ep)
                ep.http = http
                if http is not None and self.http_upstream_factory is not None:
                    ep.http_upstream = self.http_upstream_factory(http)
        self.rebuild()

    def _retire(self, ep: Endpoint) -> None:
        ep.draining = True
        if ep.outstanding == 0:
            self._close(ep)
        else:
            self._retired.append(ep)

    def _close(self, ep: Endpoint) -> None:
        up, ep.upstream = ep.upstream, None
        self._close_http(ep)
        if up is not None:
            self._spawn_close(up.close(1.0))

    def _close_http(self, ep: Endpoint) -> None:
        hup, ep.http_upstream = ep.http_upstream, None
        if hup is not None:
            self._spawn_close(hup.close(1.0))

    def _spawn_close(self, closing: Any) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            closing.close()  # no loop (tests): the coroutine never runs
            return
        task = loop.create_task(closing)
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def start(self) -> None:
        """Mark initial membership done: endpoints added from now on are slow-started."""
        self._started = True

    # ------------------------------------------------------------------ state

    def set_health(self, address: str, health: Health) -> None:
        ep = self.endpoints.get(address)
        if ep is not None and ep.health is not health:
            ep.health = health
            self.rebuild()

    def set_draining(self, address: str, draining: bool) -> bool:
        ep = self.endpoints.get(address)
        if ep is None:
            return False
        if ep.draining != draining:
            ep.draining = draining
            self.rebuild()
        return True

    def routable(self, ep: Endpoint, now: float) -> bool:
        return not ep.draining and ep.health is not Health.UNHEALTHY and not ep.is_ejected(now)

    def rebuild(self) -> None:
        """Recompute the snapshot (health, drain, ejection, panic, slow-start weights)."""
        now = self.clock.now()
        candidates = [e for e in self.endpoints.values() if not e.draining]
        routable = [e for e in candidates if self.routable(e, now)]
        panic = bool(candidates) and len(routable) * 100.0 < self.config.panic_threshold * len(candidates)
        chosen = candidates if panic else routable
        ss = self.config.slow_start
        next_step: float | None = None
        entries = []
        for e in chosen:
            weight = e.weight
            if ss.window > 0:
                age = now - e.added_at
                if age < ss.window:
                    frac = max(age, 0.0) / ss.window
                    weight *= max(ss.min_weight_percent / 100.0, frac ** (1.0 / ss.aggression))
                    next_step = ss.window / 10.0
            entries.append(Entry(e, weight))
        self._version += 1
        self.snapshot = Snapshot(self.name, tuple(entries), panic=panic, version=self._version)
        with_http = [x for x in entries if x.endpoint.http is not None]
        self.http_snapshot = self.snapshot if len(with_http) == len(entries) else \
            Snapshot(self.name, tuple(with_http), panic=panic, version=-self._version)
        if self.held and entries:
            with contextlib.suppress(RuntimeError):  # no loop: nothing can be held either
                loop = asyncio.get_running_loop()
                for listener in (self.on_ready, *self.ready_listeners):
                    if listener is not None:
                        loop.call_soon(listener)
        if panic:
            self.stats.count(self.name, "panic_snapshots")
        uneject = self.outlier.next_unejection(self.endpoints.values(), now)
        if uneject is not None:
            delay = uneject - now + 1e-3
            next_step = delay if next_step is None else min(next_step, delay)
        self._schedule(next_step)
        if self.on_change is not None:
            self.on_change(self)

    def _schedule(self, delay: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if delay is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._timer = loop.call_later(delay, self.rebuild)

    # ------------------------------------------------------------------ held calls (scale from zero)

    def enter(self) -> str | None:
        """Count a request routed here (``active``, left by the caller when it ends); why it may not
        go on when the pool is over its ``circuit_breakers.max_requests``, else None."""
        self.active += 1
        self.stats.count(self.name, "routed")
        cb = self.config.circuit_breakers
        if self.active > cb.max_requests:
            self.stats.count(self.name, "circuit_open_requests")
            return f"pool '{self.name}' is over its max_requests ({cb.max_requests})"
        return None

    def count_retry_decision(self, counter: str) -> None:
        """Count what :func:`~modelyard.balancer.retry.decide_retry` decided (its ``counter``)."""
        self.stats.count(self.name, counter)
        if counter == "retry_budget_exhausted":
            self.budget.exhausted += 1

    def hold(self, call: Any, timer: asyncio.TimerHandle) -> None:
        self.held[call] = timer
        self.stats.held[self.name] = len(self.held)
        self.notify_demand()

    def unhold(self, call: Any) -> bool:
        """Forget a held call (it was sent, failed or cancelled); False when it was not held."""
        timer = self.held.pop(call, None)
        if timer is None:
            return False
        timer.cancel()
        self.stats.held[self.name] = len(self.held)
        return True

    def take_held(self, kind: type | None = None) -> list[Any]:
        """The held calls (of ``kind`` only, when given: each data plane takes its own), forgotten."""
        calls = [c for c in self.held if kind is None or isinstance(c, kind)]
        for call in calls:
            self.unhold(call)
        return calls

    def notify_demand(self) -> None:
        """Wake admin requests waiting for demand on this pool."""
        waiters, self._demand_waiters = self._demand_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def wait_demand(self, seconds: float) -> None:
        """Return when a call is held (at once if one is), or after ``seconds``."""
        if self.held or seconds <= 0:
            return
        fut = asyncio.get_running_loop().create_future()
        self._demand_waiters.append(fut)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(fut, seconds)

    # ------------------------------------------------------------------ outcomes

    def record(self, ep: Endpoint, outcome: Outcome, latency: float, code: str, inflight: int = 0) -> None:
        """Account one finished attempt: counters, picker feedback, outlier detection."""
        self.stats.requests[(self.name, ep.address, code)] += 1
        ep.requests += 1
        if outcome is Outcome.FAILURE:
            ep.failures += 1
        self.picker.on_done(ep, outcome, latency, inflight)
        if outcome is Outcome.SUCCESS:
            ep.rtt.observe(latency)
        overflow = self.outlier.ejections_overflow
        if self.outlier.record(ep, outcome, self.clock.now(), self.endpoints.values()):
            self.stats.count(self.name, "ejections")
            self.rebuild()
        elif self.outlier.ejections_overflow != overflow:
            self.stats.count(self.name, "ejections_overflow")
        if ep.draining and ep.outstanding == 0 and ep in self._retired:
            self._retired.remove(ep)
            self._close(ep)

    # ------------------------------------------------------------------ views

    def describe(self) -> list[dict[str, Any]]:
        """Rows for ``/endpoints``."""
        now = self.clock.now()
        weights = {id(x.endpoint): x.weight for x in self.snapshot.entries}
        rows = []
        for e in self.endpoints.values():
            load = e.load
            o = e.outlier
            rows.append({
                "pool": self.name,
                "address": e.address,
                "http": e.http,
                "source": e.source,
                "weight": e.weight,
                "effective_weight": round(weights.get(id(e), e.weight), 4),
                "health": e.health.value,
                "draining": e.draining,
                "ejected": e.is_ejected(now),
                "ejected_for_s": round(max(0.0, o.ejected_until - now), 3),
                "times_ejected": o.times_ejected,
                "outstanding": e.outstanding,
                "requests": e.requests,
                "failures": e.failures,
                "consecutive_failures": o.consecutive_failures,
                "ewma_ms": round(load.estimate(now) * 1e3, 3) if hasattr(load, "estimate") else None,
                "routable": id(e) in weights,
                "panic": self.snapshot.panic,
            })
        return rows

    def control_state(self) -> list[dict[str, Any]]:
        """Membership + health + drain, shipped from the control process to workers."""
        return [{"address": e.address, "weight": e.weight, "source": e.source, "http": e.http,
                 "health": e.health.value, "draining": e.draining} for e in self.endpoints.values()]

    def apply_control_state(self, rows: list[dict[str, Any]]) -> None:
        """Worker side of :meth:`control_state`: adopt membership, health and drain."""
        self._sources = {"control": {r["address"]: (r["weight"], r.get("http")) for r in rows}}
        self._reconcile()
        changed = False
        for r in rows:
            ep = self.endpoints.get(r["address"])
            if ep is None:
                continue
            h = Health(r["health"])
            if ep.health is not h or ep.draining != r["draining"]:
                ep.health, ep.draining, changed = h, r["draining"], True
        if changed:
            self.rebuild()

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for e in [*self.endpoints.values(), *self._retired]:
            up, e.upstream = e.upstream, None
            if up is not None:
                await up.close(None)
            hup, e.http_upstream = e.http_upstream, None
            if hup is not None:
                await hup.close(None)
