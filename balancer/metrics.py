"""Data-plane counters kept as plain dicts (cheap on the hot path) and exported through
a prometheus-client collector on the balancer's own ``CollectorRegistry``.

In multi-worker mode each worker ships ``Stats.dump()`` to the control process,
which merges the dumps (:func:`merge_dumps`) and exports the sum.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

#: latency histogram bucket upper bounds, seconds
BUCKETS: tuple[float, ...] = (
    # 0.03 and 0.075 are the SLO thresholds of deploy/prometheus (p50 < 30 ms, p95 < 75 ms, p99 < 100 ms)
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)


class Stats:
    """Every decision the data plane makes, counted (Envoy-style stats)."""

    def __init__(self) -> None:
        #: (pool, endpoint, grpc code name) -> attempts
        self.requests: dict[tuple[str, str, str], int] = defaultdict(int)
        #: pool -> [bucket counts..., +Inf count], and sum
        self.latency_counts: dict[str, list[int]] = {}
        self.latency_sum: dict[str, float] = defaultdict(float)
        #: (pool, counter name) -> count: retries, retry_budget_exhausted, ejections,
        #: ejections_overflow, circuit_open_requests, circuit_open_pending, circuit_open_retries,
        #: no_endpoint, panic_picks, hc_success, hc_failure, routed
        self.events: dict[tuple[str, str], int] = defaultdict(int)
        #: pool -> requests held now because the pool has no endpoint (activator)
        self.held: dict[str, int] = defaultdict(int)

    def observe_latency(self, pool: str, seconds: float) -> None:
        counts = self.latency_counts.get(pool)
        if counts is None:
            counts = self.latency_counts[pool] = [0] * (len(BUCKETS) + 1)
        counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.latency_sum[pool] += seconds

    def count(self, pool: str, event: str, n: int = 1) -> None:
        self.events[(pool, event)] += n

    def dump(self) -> dict[str, Any]:
        """JSON/pickle-able copy of the counters."""
        return {
            "requests": [[*k, v] for k, v in self.requests.items()],
            "latency_counts": {k: list(v) for k, v in self.latency_counts.items()},
            "latency_sum": dict(self.latency_sum),
            "events": [[*k, v] for k, v in self.events.items()],
            "held": dict(self.held),
        }


def merge_dumps(dumps: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Sum several :meth:`Stats.dump` results."""
    total = Stats()
    for d in dumps:
        for pool, ep, code, v in d["requests"]:
            total.requests[(pool, ep, code)] += v
        for pool, counts in d["latency_counts"].items():
            cur = total.latency_counts.setdefault(pool, [0] * len(counts))
            for i, c in enumerate(counts):
                cur[i] += c
        for pool, s in d["latency_sum"].items():
            total.latency_sum[pool] += s
        for pool, ev, v in d["events"]:
            total.events[(pool, ev)] += v
        for pool, n in d.get("held", {}).items():
            total.held[pool] += n
    return total.dump()


class BalancerCollector(Collector):
    """Exports merged stats plus per-endpoint gauges from ``endpoints()`` rows."""

    def __init__(self, stats: Callable[[], dict[str, Any]], endpoints: Callable[[], list[dict[str, Any]]]) -> None:
        self._stats = stats
        self._endpoints = endpoints

    def collect(self) -> Iterator[Any]:
        d = self._stats()
        req = CounterMetricFamily("modelyard_balancer_requests", "Upstream attempts by pool, endpoint and gRPC code",
                                  labels=["pool", "endpoint", "code"])
        for pool, ep, code, v in d["requests"]:
            req.add_metric([pool, ep, code], v)
        yield req
        hist = HistogramMetricFamily("modelyard_balancer_request_duration_seconds",
                                     "Request latency through the balancer (all attempts)", labels=["pool"])
        for pool, counts in d["latency_counts"].items():
            cum, buckets = 0, []
            for le, c in zip((*BUCKETS, float("inf")), counts, strict=True):
                cum += c
                buckets.append(("+Inf" if le == float("inf") else repr(le), cum))
            hist.add_metric([pool], buckets, d["latency_sum"].get(pool, 0.0))
        yield hist
        events: dict[str, CounterMetricFamily] = {}
        for pool, ev, v in d["events"]:
            fam = events.get(ev)
            if fam is None:
                fam = events[ev] = CounterMetricFamily(f"modelyard_balancer_{ev}", f"Balancer decisions: {ev}",
                                                       labels=["pool"])
            fam.add_metric([pool], v)
        yield from events.values()
        held = GaugeMetricFamily("modelyard_balancer_held_requests",
                                 "Requests held because the pool has no endpoint (scale from zero)", labels=["pool"])
        for pool, n in d.get("held", {}).items():
            held.add_metric([pool], n)
        yield held
        rows = self._endpoints()
        out = GaugeMetricFamily("modelyard_balancer_outstanding_requests", "Requests in flight per endpoint",
                                labels=["pool", "endpoint"])
        state = GaugeMetricFamily("modelyard_balancer_endpoint_routable", "1 when the endpoint receives new picks",
                                  labels=["pool", "endpoint"])
        ej = CounterMetricFamily("modelyard_balancer_endpoint_ejections", "Times the endpoint was ejected",
                                 labels=["pool", "endpoint"])
        for r in rows:
            labels = [r["pool"], r["address"]]
            out.add_metric(labels, r["outstanding"])
            state.add_metric(labels, 1.0 if r["routable"] else 0.0)
            ej.add_metric(labels, r["times_ejected"])
        yield out
        yield state
        yield ej


def make_registry(collector: Collector) -> CollectorRegistry:
    """A registry of our own (never the global one) holding ``collector``."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    return reg
