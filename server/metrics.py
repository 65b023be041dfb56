"""Prometheus metrics for one server, in a registry of its own (never the global one).

The hot path only bumps plain Python numbers: each label set is a small object
whose ``inc``/``observe`` is an attribute add (histograms: one ``bisect``). The
exposition is built when ``/metrics`` is scraped, by a collector that walks those
objects. prometheus_client's own metric classes take a lock and do several calls
per update; at ~10 updates per request that was a third of modelyard's own
per-request CPU time (measured with cProfile, see docs/operations.md).

Every child has a single writer: the event loop, or, for an instance's busy
time, that instance's own worker thread.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

_LATENCY_BUCKETS = (
    # 0.03 and 0.075: the SLO thresholds of deploy/prometheus, so that their counts are exact
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _Value:
    """A counter or gauge child."""

    __slots__ = ("fn", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.fn: Callable[[], float] | None = None

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = value

    def set_function(self, fn: Callable[[], float]) -> None:
        """Read the value from ``fn()`` at scrape time instead."""
        self.fn = fn

    def get(self) -> float:
        return float(self.fn()) if self.fn is not None else self.value


class _Histogram:
    """A histogram child: per-bucket counts (not cumulative) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class _Family:
    """One metric name with its label names; ``labels(...)`` returns a cached child."""

    def __init__(self, kind: str, name: str, doc: str, labelnames: Sequence[str],
                 buckets: tuple[float, ...] = ()) -> None:
        self.kind = kind
        self.name = name
        self.doc = doc
        self.labelnames = list(labelnames)
        self.buckets = buckets
        self.children: dict[tuple[str, ...], _Value | _Histogram] = {}

    def labels(self, *values: str) -> Any:
        key = tuple(str(v) for v in values)
        child = self.children.get(key)
        if child is None:
            if len(key) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {key}")
            child = _Histogram(self.buckets) if self.kind == "histogram" else _Value()
            self.children[key] = child
        return child

    def collect(self) -> Metric:
        if self.kind == "counter":
            fam: Metric = CounterMetricFamily(self.name, self.doc, labels=self.labelnames)
        elif self.kind == "gauge":
            fam = GaugeMetricFamily(self.name, self.doc, labels=self.labelnames)
        else:
            fam = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        for key, child in list(self.children.items()):
            if isinstance(child, _Histogram):
                cumulative, running = [], 0
                for bound, count in zip((*child.bounds, float("inf")), child.counts, strict=True):
                    running += count
                    cumulative.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
                fam.add_metric(list(key), buckets=cumulative, sum_value=child.sum)  # type: ignore[attr-defined]
            else:
                fam.add_metric(list(key), child.get())  # type: ignore[attr-defined]
        return fam


class ServerMetrics:
    """Every metric the server exports. One instance per server process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self._families: list[_Family] = []
        f = self._family
        self.requests = f("counter", "modelyard_requests", "Inference requests by model, version and gRPC status.",
                          ["model", "version", "status"])
        self.request_latency = f("histogram", "modelyard_request_duration_seconds",
                                 "Total time of an inference request inside the server.", ["model", "version"])
        self.queue_latency = f("histogram", "modelyard_queue_duration_seconds",
                               "Time a request waited before its batch started computing.", ["model", "version"])
        self.compute_latency = f("histogram", "modelyard_compute_duration_seconds",
                                 "Time a batch spent in the model's execute().", ["model", "version"])
        self.batch_size = f("histogram", "modelyard_batch_size", "Requests per executed batch.",
                            ["model", "version"], _BATCH_BUCKETS)
        self.inflight = f("gauge", "modelyard_inflight_requests", "Requests inside the server (queued or computing).",
                          ["model"])
        self.queue_depth = f("gauge", "modelyard_queue_depth", "Requests waiting in a model's scheduler queue.",
                             ["model", "version"])
        self.instance_busy = f("counter", "modelyard_instance_busy_seconds",
                               "Seconds each model instance spent computing (rate = utilisation).",
                               ["model", "version", "instance"])
        self.load_seconds = f("gauge", "modelyard_model_load_seconds", "Time the last load of a model version took.",
                              ["model", "version"])
        self.warmup_seconds = f("gauge", "modelyard_model_warmup_seconds", "Time the warmup of a model version took.",
                                ["model", "version"])
        self.model_ready = f("gauge", "modelyard_model_ready", "1 when a model version is READY.", ["model", "version"])
        self.cache_hits = f("counter", "modelyard_cache_hits", "Response cache hits.", ["model", "version"])
        self.cache_misses = f("counter", "modelyard_cache_misses", "Response cache misses.", ["model", "version"])
        self.refused = f("counter", "modelyard_refused",
                         "Calls refused before reaching a model: unauthenticated, permission_denied, rate_limited, "
                         "shed_inflight, shed_queue.", ["reason"])
        self.registry.register(self)  # type: ignore[arg-type]

    def _family(self, kind: str, name: str, doc: str, labelnames: Sequence[str],
                buckets: tuple[float, ...] = _LATENCY_BUCKETS) -> _Family:
        fam = _Family(kind, name, doc, labelnames, buckets if kind == "histogram" else ())
        self._families.append(fam)
        return fam

    def collect(self) -> Iterator[Metric]:
        """prometheus_client's Collector protocol: called at scrape time."""
        for fam in self._families:
            yield fam.collect()

    def describe(self) -> Iterator[Metric]:
        for fam in self._families:
            yield fam.collect()

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)
