"""Prometheus metrics for one server, in a registry of its own (never the global one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    """Every metric the server exports. One instance per server process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "modelyard_requests", "Inference requests by model, version and gRPC status.",
            ["model", "version", "status"], registry=r,
        )
        self.request_latency = Histogram(
            "modelyard_request_duration_seconds", "Total time of an inference request inside the server.",
            ["model", "version"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.queue_latency = Histogram(
            "modelyard_queue_duration_seconds", "Time a request waited before its batch started computing.",
            ["model", "version"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.compute_latency = Histogram(
            "modelyard_compute_duration_seconds", "Time a batch spent in the model's execute().",
            ["model", "version"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "modelyard_batch_size", "Requests per executed batch.", ["model", "version"],
            buckets=_BATCH_BUCKETS, registry=r,
        )
        self.inflight = Gauge(
            "modelyard_inflight_requests", "Requests inside the server (queued or computing).", ["model"], registry=r,
        )
        self.queue_depth = Gauge(
            "modelyard_queue_depth", "Requests waiting in a model's scheduler queue.", ["model", "version"], registry=r,
        )
        self.instance_busy = Counter(
            "modelyard_instance_busy_seconds", "Seconds each model instance spent computing (rate = utilisation).",
            ["model", "version", "instance"], registry=r,
        )
        self.load_seconds = Gauge(
            "modelyard_model_load_seconds", "Time the last load of a model version took.", ["model", "version"], registry=r,
        )
        self.warmup_seconds = Gauge(
            "modelyard_model_warmup_seconds", "Time the warmup of a model version took.", ["model", "version"], registry=r,
        )
        self.model_ready = Gauge(
            "modelyard_model_ready", "1 when a model version is READY.", ["model", "version"], registry=r,
        )
        self.cache_hits = Counter("modelyard_cache_hits", "Response cache hits.", ["model", "version"], registry=r)
        self.cache_misses = Counter("modelyard_cache_misses", "Response cache misses.", ["model", "version"], registry=r)

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)
