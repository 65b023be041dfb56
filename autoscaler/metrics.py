"""Where the policy's samples come from: the balancer's admin ``/metrics`` and the replicas' ``/metrics``.

Both are Prometheus text. Rates come from counters read twice (the delta over the time between
two scrapes of the same source); a counter that went backwards (a restart) gives no rate that tick.

- **Balancer** (per pool): requests/s and the mean number in flight from its latency histogram
  (Little's law: the latency seconds accrued per second *is* the average concurrency), at least
  the instantaneous ``outstanding`` gauge (requests not finished yet are not in the histogram),
  the p99 from the histogram's buckets, and the requests it holds for a pool with no replica.
- **Replicas**: queue depth and in-flight gauges, and the model instances' busy seconds (for the
  ``slo`` mode's service time: busy seconds per request, the utilization law).

A replica that does not answer is left out -- its share is the mean of those that answered, times
the ready replicas (as Knative extrapolates from the pods it scraped) -- never counted as zero; when
nothing answers the field is None and the policy holds.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from modelyard.autoscaler.policy import Sample
from modelyard.config import Check

log = logging.getLogger("modelyard.autoscaler")


@dataclass
class SourceConfig:
    """Where a pool's load is read."""

    #: the balancer's admin address (host:port) whose /metrics has this pool; empty = not used
    balancer_admin: str = ""
    #: the pool's name in the balancer (default: the autoscaler pool's name)
    balancer_pool: str = ""
    #: also scrape each ready replica's /metrics (queue depth, in-flight, busy time)
    replicas: bool = True
    #: count only these models on the replicas (empty = every model)
    models: list[str] = field(default_factory=list)
    #: seconds one scrape may take
    timeout: float = 1.0

    def validate(self, check: Check) -> None:
        check(self.timeout > 0, "timeout", "must be > 0")
        check(bool(self.balancer_admin) or self.replicas, "balancer_admin",
              "is required when replicas: false (there would be no source at all)")


# ------------------------------------------------------------------ Prometheus text


Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_metrics(text: str) -> Series:
    """Every sample of a Prometheus text page: ``(name, sorted labels) -> value``."""
    out: Series = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def select(series: Series, name: str, **labels: str | Sequence[str]) -> Iterable[tuple[dict[str, str], float]]:
    """Samples of ``name`` whose labels match (a label given as a list matches any of its values)."""
    for (n, lbl), v in series.items():
        if n != name:
            continue
        d = dict(lbl)
        ok = True
        for k, want in labels.items():
            have = d.get(k)
            if isinstance(want, str):
                ok = have == want
            else:
                ok = not want or have in want
            if not ok:
                break
        if ok:
            yield d, v


def total(series: Series, name: str, **labels: str | Sequence[str]) -> float:
    return sum(v for _, v in select(series, name, **labels))


def buckets(series: Series, name: str, **labels: str | Sequence[str]) -> dict[float, float]:
    """Cumulative histogram buckets (``le`` -> count), summed over the matching series."""
    out: dict[float, float] = {}
    for d, v in select(series, f"{name}_bucket", **labels):
        le = float(d["le"])
        out[le] = out.get(le, 0.0) + v
    return out


def histogram_quantile(q: float, cumulative: dict[float, float]) -> float | None:
    """Prometheus' ``histogram_quantile``: linear interpolation inside the bucket holding rank q."""
    if not cumulative:
        return None
    les = sorted(cumulative)
    count = cumulative[les[-1]]
    if count <= 0:
        return None
    rank = q * count
    prev_le, prev_c = 0.0, 0.0
    for le in les:
        c = cumulative[le]
        if c >= rank:
            if math.isinf(le):
                return prev_le  # the highest finite bound: all we can say
            if c == prev_c:
                return le
            return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    return prev_le


def quantiles_ms(cumulative: dict[float, float]) -> tuple[float | None, float | None]:
    """(p50, p99) in ms of a histogram's buckets."""
    p50, p99 = histogram_quantile(0.5, cumulative), histogram_quantile(0.99, cumulative)
    return (None if p50 is None else p50 * 1e3), (None if p99 is None else p99 * 1e3)


class Rates:
    """Counter deltas between scrapes of one source; None while there is no earlier reading or after a reset."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, float]] = {}

    def delta(self, key: str, now: float, value: float) -> tuple[float, float] | None:
        """(value increase, seconds) since the previous reading of ``key``."""
        prev = self._last.get(key)
        self._last[key] = (now, value)
        if prev is None or now <= prev[0] or value < prev[1]:
            return None
        return value - prev[1], now - prev[0]

    def forget(self, keep: Iterable[str]) -> None:
        keep_set = set(keep)
        for key in [k for k in self._last if k.split("|", 1)[0] not in keep_set]:
            del self._last[key]


# ------------------------------------------------------------------ the source


@dataclass
class Reading:
    """What one tick could measure (pool totals; None = not measured)."""

    concurrency: float | None = None
    rps: float | None = None
    queue: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    service_s: float | None = None
    instances: int = 1
    held: int = 0
    #: sources that did not answer, with why
    missing: list[str] = field(default_factory=list)


BAL_LATENCY = "modelyard_balancer_request_duration_seconds"
BAL_OUTSTANDING = "modelyard_balancer_outstanding_requests"
BAL_HELD = "modelyard_balancer_held_requests"
SRV_LATENCY = "modelyard_request_duration_seconds"
SRV_QUEUE = "modelyard_queue_depth"
SRV_INFLIGHT = "modelyard_inflight_requests"
SRV_BUSY = "modelyard_instance_busy_seconds_total"


class MetricsSource:
    """Reads one pool's load each tick from the balancer and/or the replicas."""

    def __init__(self, pool: str, config: SourceConfig, session: aiohttp.ClientSession | None = None) -> None:
        self.pool = pool
        self.config = config
        self.balancer_pool = config.balancer_pool or pool
        self._session = session
        self._own_session = session is None
        self._rates = Rates()
        self._hist: dict[str, dict[float, float]] = {}

    async def _get(self, url: str) -> Series:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        timeout = aiohttp.ClientTimeout(total=self.config.timeout)
        async with self._session.get(url, timeout=timeout) as r:
            if r.status != 200:
                raise OSError(f"HTTP {r.status}")
            return parse_metrics(await r.text())

    def _hist_delta(self, key: str, now_buckets: dict[float, float]) -> dict[float, float] | None:
        prev = self._hist.get(key)
        self._hist[key] = now_buckets
        if prev is None:
            return None
        delta = {le: c - prev.get(le, 0.0) for le, c in now_buckets.items()}
        if any(v < 0 for v in delta.values()):
            return None
        return delta

    async def read(self, now: float, ready: int, replica_urls: Sequence[str]) -> Reading:
        """One tick's reading. ``replica_urls`` are the ready replicas' HTTP bases (``http://host:port``)."""
        cfg = self.config
        out = Reading()
        tasks: dict[str, Any] = {}
        if cfg.balancer_admin:
            tasks["balancer"] = self._get(f"http://{cfg.balancer_admin}/metrics")
        if cfg.replicas:
            for url in replica_urls:
                tasks[url] = self._get(f"{url}/metrics")
        results = await asyncio.gather(*tasks.values(), return_exceptions=True)
        pages: dict[str, Series] = {}
        for key, res in zip(tasks, results, strict=True):
            if isinstance(res, BaseException):
                out.missing.append(f"{key}: {type(res).__name__}: {res}" if str(res) else f"{key}: {type(res).__name__}")
            else:
                pages[key] = res
        self._rates.forget(["balancer", *replica_urls])
        bal = pages.get("balancer")
        if bal is not None:
            self._read_balancer(bal, now, out)
        replica_pages = {u: pages[u] for u in replica_urls if u in pages}
        if replica_pages:
            self._read_replicas(replica_pages, now, ready, out)
        return out

    def _read_balancer(self, page: Series, now: float, out: Reading) -> None:
        pool = self.balancer_pool
        outstanding = total(page, BAL_OUTSTANDING, pool=pool)
        out.held = int(total(page, BAL_HELD, pool=pool))
        count = total(page, f"{BAL_LATENCY}_count", pool=pool)
        seconds = total(page, f"{BAL_LATENCY}_sum", pool=pool)
        d_count = self._rates.delta("balancer|count", now, count)
        d_sum = self._rates.delta("balancer|sum", now, seconds)
        if d_count is not None and d_sum is not None:
            out.rps = d_count[0] / d_count[1]
            out.concurrency = max(d_sum[0] / d_sum[1], outstanding)
        else:
            out.concurrency = outstanding
        delta = self._hist_delta("balancer", buckets(page, BAL_LATENCY, pool=pool))
        if delta is not None:
            out.p50_ms, out.p99_ms = quantiles_ms(delta)

    def _read_replicas(self, pages: dict[str, Series], now: float, ready: int, out: Reading) -> None:
        models = self.config.models
        queues, inflight, rps, conc = [], [], [], []
        busy = requests = 0.0
        instances = []
        merged: dict[float, float] = {}
        have_hist = True
        for url, page in pages.items():
            queues.append(total(page, SRV_QUEUE, model=models))
            inflight.append(total(page, SRV_INFLIGHT, model=models))
            inst = sum(1 for _ in select(page, SRV_BUSY, model=models))
            instances.append(inst)
            d_busy = self._rates.delta(f"{url}|busy", now, total(page, SRV_BUSY, model=models))
            d_req = self._rates.delta(f"{url}|count", now, total(page, f"{SRV_LATENCY}_count", model=models))
            d_sum = self._rates.delta(f"{url}|sum", now, total(page, f"{SRV_LATENCY}_sum", model=models))
            if d_req is not None:
                rps.append(d_req[0] / d_req[1])
                if d_busy is not None:
                    busy += d_busy[0]
                    requests += d_req[0]
            if d_sum is not None:
                conc.append(max(d_sum[0] / d_sum[1], inflight[-1]))
            delta = self._hist_delta(url, buckets(page, SRV_LATENCY, model=models))
            if delta is None:
                have_hist = False
            else:
                for le, c in delta.items():
                    merged[le] = merged.get(le, 0.0) + c
        n = max(ready, len(pages))

        def scaled(values: list[float]) -> float | None:
            # the mean of the replicas that answered stands for each ready replica
            return sum(values) / len(values) * n if values else None

        out.queue = scaled(queues)
        out.instances = max(1, round(sum(instances) / len(instances))) if instances else 1
        if requests > 0:
            out.service_s = busy / requests
        if out.rps is None:
            out.rps = scaled(rps)
        if out.concurrency is None:
            out.concurrency = scaled(conc) if conc else scaled(inflight)
        if out.p99_ms is None and have_hist and merged:
            out.p50_ms, out.p99_ms = quantiles_ms(merged)

    def sample(self, reading: Reading, now: float, replicas: int, ready: int) -> Sample:
        """The policy's view of this tick."""
        return Sample(time=now, replicas=replicas, ready=ready, concurrency=reading.concurrency, rps=reading.rps,
                      queue=reading.queue, p99_ms=reading.p99_ms, service_s=reading.service_s,
                      instances=reading.instances, held=reading.held)

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None
