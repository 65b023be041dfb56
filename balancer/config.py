"""Balancer configuration: dataclasses with documented defaults, each validating itself.

Loaded by the one config loader (:mod:`modelyard.config`): ``load_config(path)`` /
``config_from_dict(data)`` check the whole document and raise :class:`ConfigError` listing
every problem with its path (``pools.cpu.retry.max_attempts: must be >= 1``), so a bad file
is refused at start with all its errors at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelyard.balancer.limits import LimitsConfig
from modelyard.balancer.outlier import OutlierConfig
from modelyard.balancer.pickers import PICKERS
from modelyard.balancer.rest.config import RestConfig
from modelyard.balancer.retry import HedgeConfig, RetryConfig
from modelyard.balancer.xds import XdsConfig
from modelyard.config import Check, ConfigError, load, read_yaml, to_dict
from modelyard.security.config import AuthConfig, RateLimitConfig, TlsConfig, UpstreamTlsConfig
from modelyard.tracing import TracingConfig

__all__ = ["BalancerConfig", "ConfigError", "PoolConfig", "config_from_dict", "config_to_dict", "host_port_ok",
           "load_config"]

SOURCE = "balancer config"


def host_port_ok(address: str) -> bool:
    """``host:port`` with a port number in range."""
    host, sep, port = address.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 <= int(port) < 65536)


@dataclass
class ListenerConfig:
    """A gRPC listening address of the proxy."""

    address: str = "127.0.0.1:9001"
    name: str = "main"

    def validate(self, check: Check) -> None:
        check(host_port_ok(self.address), "address", f"expected host:port, got {self.address!r}")


@dataclass
class AdminConfig:
    """The admin HTTP server (metrics, endpoints, drain); ``address: null`` disables it."""

    address: str | None = "127.0.0.1:9901"

    def validate(self, check: Check) -> None:
        if self.address is not None:
            check(host_port_ok(self.address), "address", f"expected host:port, got {self.address!r}")


@dataclass
class HealthCheckConfig:
    """Active grpc.health.v1 checks (Envoy names)."""

    enabled: bool = True
    interval: float = 2.0
    timeout: float = 1.0
    #: consecutive successes to become healthy again
    healthy_threshold: int = 1
    #: consecutive failures to become unhealthy
    unhealthy_threshold: int = 2
    #: grpc.health.v1 service name checked ("" = the whole server)
    service: str = ""
    #: also check each model routed to this pool by name (service = model name)
    per_model: bool = False

    def validate(self, check: Check) -> None:
        check(self.interval > 0, "interval", "must be > 0")
        check(self.timeout > 0, "timeout", "must be > 0")
        check(self.healthy_threshold >= 1, "healthy_threshold", "must be >= 1")
        check(self.unhealthy_threshold >= 1, "unhealthy_threshold", "must be >= 1")


@dataclass
class SlowStartConfig:
    """Ramp a new endpoint's weight over ``window`` seconds (0 disables), Envoy style."""

    window: float = 0.0
    aggression: float = 1.0
    min_weight_percent: float = 10.0

    def validate(self, check: Check) -> None:
        check(self.window >= 0, "window", "must be >= 0")
        check(self.aggression > 0, "aggression", "must be > 0")
        check(0 < self.min_weight_percent <= 100, "min_weight_percent", "must be within (0, 100]")


@dataclass
class CircuitBreakerConfig:
    """Per-pool limits; over a limit the request fails at once with RESOURCE_EXHAUSTED."""

    #: requests in flight to the pool
    max_requests: int = 10000
    #: requests in flight whose connection was not yet ready when sent
    max_pending: int = 1024
    #: retries in flight
    max_retries: int = 64

    def validate(self, check: Check) -> None:
        for k in ("max_requests", "max_pending", "max_retries"):
            check(getattr(self, k) >= 0, k, "must be >= 0")


@dataclass
class StaticEndpoint:
    """One endpoint written in the config; a bare ``host:port`` string also works."""

    address: str = ""
    weight: float = 1.0
    #: the same replica's HTTP (REST) address, for the REST listener
    http: str | None = None

    @classmethod
    def normalize(cls, raw: Any) -> Any:
        return {"address": raw} if isinstance(raw, str) else raw

    def validate(self, check: Check) -> None:
        check(host_port_ok(self.address), "address", f"expected host:port, got {self.address!r}")
        check(self.weight > 0, "weight", "must be > 0")
        if self.http is not None:
            check(host_port_ok(self.http), "http", f"expected host:port, got {self.http!r}")


@dataclass
class DnsConfig:
    """Re-resolve ``name`` every ``interval`` seconds; each A/AAAA record is an endpoint."""

    name: str = ""
    port: int = 8001
    #: the replicas' HTTP (REST) port, for the REST listener (null: none)
    http_port: int | None = None
    interval: float = 5.0

    def validate(self, check: Check) -> None:
        check(bool(self.name), "name", "is required")
        check(0 < self.port < 65536, "port", "must be a port number")
        check(self.http_port is None or 0 < self.http_port < 65536, "http_port", "must be a port number")
        check(self.interval > 0, "interval", "must be > 0")


@dataclass
class KubernetesConfig:
    """Watch the EndpointSlices of ``service`` (label kubernetes.io/service-name)."""

    service: str = ""
    namespace: str = "default"
    #: port name in the slice; empty = the first port
    port_name: str = ""
    #: the slice's port of the replicas' HTTP (REST) address, for the REST listener (empty: none)
    http_port_name: str = "http"
    #: API server URL (no auth); empty = the in-cluster service-account config
    api_server: str = ""

    def validate(self, check: Check) -> None:
        check(bool(self.service), "service", "is required")


@dataclass
class EndpointsConfig:
    """Where a pool's endpoints come from; several sources may be combined."""

    static: list[StaticEndpoint] = field(default_factory=list)
    #: JSON or YAML file with a list of addresses or {address, weight, http}; reloaded on change
    file: str | None = None
    file_poll_interval: float = 1.0
    dns: DnsConfig | None = None
    kubernetes: KubernetesConfig | None = None

    def validate(self, check: Check) -> None:
        check(self.file_poll_interval > 0, "file_poll_interval", "must be > 0")


@dataclass
class ActivatorConfig:
    """Scale from zero (Knative's activator): while the pool has no endpoint to pick, hold requests
    until one is added instead of failing them. The held count is the demand an autoscaler reads
    (``modelyard_balancer_held_requests``, ``GET /pools/<pool>/demand``)."""

    enabled: bool = False
    #: requests held at most; beyond it RESOURCE_EXHAUSTED at once
    max_requests: int = 100
    #: seconds a request is held at most (and never past its own deadline); then UNAVAILABLE
    timeout: float = 10.0

    def validate(self, check: Check) -> None:
        check(self.max_requests >= 1, "max_requests", "must be >= 1")
        check(self.timeout > 0, "timeout", "must be > 0")


@dataclass
class PoolConfig:
    """A set of interchangeable upstream endpoints and how to balance over them."""

    picker: str = "least_latency"
    picker_options: dict[str, Any] = field(default_factory=dict)
    endpoints: EndpointsConfig = field(default_factory=EndpointsConfig)
    #: HTTP/2 connections per endpoint
    channels_per_endpoint: int = 2
    #: seconds a TCP connect to an endpoint may take before the attempt fails over
    connect_timeout: float = 1.0
    #: per-attempt-chain timeout in seconds (min with the client's deadline); null = client's only
    timeout: float | None = None
    health_check: HealthCheckConfig = field(default_factory=HealthCheckConfig)
    outlier_detection: OutlierConfig = field(default_factory=OutlierConfig)
    slow_start: SlowStartConfig = field(default_factory=SlowStartConfig)
    #: below this share (%) of routable endpoints, route to all of them (0 disables)
    panic_threshold: float = 50.0
    circuit_breakers: CircuitBreakerConfig = field(default_factory=CircuitBreakerConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    hedge: HedgeConfig = field(default_factory=HedgeConfig)
    activator: ActivatorConfig = field(default_factory=ActivatorConfig)
    #: TLS / mTLS to this pool's endpoints (gRPC data, health checks, REST)
    tls: UpstreamTlsConfig = field(default_factory=UpstreamTlsConfig)
    #: requests of one Triton sequence (same model and ``sequence_id`` parameter) go to one endpoint, chosen
    #: by rendezvous hashing, and are never retried elsewhere nor hedged (balancer/affinity.py)
    sequence_affinity: bool = True

    def validate(self, check: Check) -> None:
        if self.picker not in PICKERS:
            check.fail("picker", f"unknown picker {self.picker!r} (known: {', '.join(sorted(PICKERS))})")
        else:
            try:
                PICKERS[self.picker](**self.picker_options)
            except (TypeError, ValueError) as exc:
                check.fail("picker_options", str(exc))
        check(self.channels_per_endpoint >= 1, "channels_per_endpoint", "must be >= 1")
        check(self.connect_timeout > 0, "connect_timeout", "must be > 0")
        check(self.timeout is None or self.timeout > 0, "timeout", "must be > 0")
        check(0 <= self.panic_threshold <= 100, "panic_threshold", "must be within 0..100")


@dataclass
class RouteMatch:
    """Glob patterns (fnmatch) on service, method and model name; empty matches anything."""

    service: str = ""
    method: str = ""
    #: model name peeked from ModelInfer/ModelStreamInfer requests
    model: str = ""


@dataclass
class WeightedPool:
    """One arm of a weighted split (canary / A-B)."""

    pool: str = ""
    weight: float = 1.0

    def validate(self, check: Check) -> None:
        check(self.weight >= 0, "weight", "must be >= 0")


@dataclass
class RouteConfig:
    """First matching route wins; it sends to ``pool`` or to a weighted ``split`` of pools."""

    match: RouteMatch = field(default_factory=RouteMatch)
    pool: str | None = None
    split: list[WeightedPool] = field(default_factory=list)

    def validate(self, check: Check) -> None:
        if (self.pool is None) == (not self.split):
            check.fail("", "exactly one of pool or split is required")
        if self.split and sum(a.weight for a in self.split) <= 0:
            check.fail("split", "weights must add up to more than 0")


@dataclass
class DrainConfig:
    """Shutdown: report NOT_SERVING for ``delay`` s, then stop accepting, wait ``grace`` s for in-flight."""

    delay: float = 0.0
    grace: float = 30.0

    def validate(self, check: Check) -> None:
        check(self.delay >= 0, "delay", "must be >= 0")
        check(self.grace >= 0, "grace", "must be >= 0")


@dataclass
class BalancerConfig:
    """The whole balancer."""

    listeners: list[ListenerConfig] = field(default_factory=lambda: [ListenerConfig()])
    admin: AdminConfig = field(default_factory=AdminConfig)
    #: data-plane processes sharing the listen port (SO_REUSEPORT)
    workers: int = 1
    routes: list[RouteConfig] = field(default_factory=list)
    pools: dict[str, PoolConfig] = field(default_factory=dict)
    #: extra fully qualified unary methods ("/pkg.Svc/Method"); unknown methods are proxied as streams
    unary_methods: list[str] = field(default_factory=list)
    #: extra unary methods safe to send twice (hedged after a per-try timeout); the inference service's
    #: reads and ModelInfer, and health Check, are already
    idempotent_methods: list[str] = field(default_factory=list)
    max_message_bytes: int = 256 * 1024 * 1024
    drain: DrainConfig = field(default_factory=DrainConfig)
    #: limits of the client-facing HTTP/2 server against hostile clients (docs/balancer.md)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    #: the xDS control plane for Envoy and proxyless gRPC clients (off unless ``xds.address`` is set)
    xds: XdsConfig = field(default_factory=XdsConfig)
    #: the REST (HTTP/1.1) listener, routed by model to the endpoints' ``http`` addresses (off without listeners)
    rest: RestConfig = field(default_factory=RestConfig)
    #: OpenTelemetry spans (pick) and traceparent propagation with the balancer's span as parent (off by default)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    #: TLS (mTLS with ``client_ca``) on every gRPC and REST listener; certificates reloaded on change
    tls: TlsConfig = field(default_factory=TlsConfig)
    #: bearer tokens checked at the balancer (the token still goes on to the replicas); off by default
    auth: AuthConfig = field(default_factory=AuthConfig)
    #: per-client token buckets at the balancer (client = token name, else peer address)
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)

    def validate(self, check: Check) -> None:
        check(bool(self.listeners), "listeners", "at least one listener is required")
        check(self.workers >= 1, "workers", "must be >= 1")
        check(self.max_message_bytes > 0, "max_message_bytes", "must be > 0")
        for key in ("unary_methods", "idempotent_methods"):
            for m in getattr(self, key):
                check(m.startswith("/") and m.count("/") == 2, key, f"expected /package.Service/Method, got {m!r}")
        check(bool(self.pools), "pools", "at least one pool is required")
        check(bool(self.routes) or len(self.pools) <= 1, "routes", "required when there is more than one pool")
        for i, r in enumerate(self.routes):
            if r.pool is not None and r.pool not in self.pools:
                check.fail(f"routes[{i}].pool", f"unknown pool {r.pool!r}")
            for j, arm in enumerate(r.split):
                if arm.pool not in self.pools:
                    check.fail(f"routes[{i}].split[{j}].pool", f"unknown pool {arm.pool!r}")


def config_from_dict(data: Any) -> BalancerConfig:
    """Build and validate a config from parsed YAML/JSON; raise :class:`ConfigError` with every error."""
    cfg = load(BalancerConfig, data, source=SOURCE)
    if not cfg.routes:
        cfg.routes = [RouteConfig(pool=next(iter(cfg.pools)))]
    return cfg


def load_config(path: str | Path) -> BalancerConfig:
    """Read a YAML (or JSON) config file; raise :class:`ConfigError` listing every problem."""
    return config_from_dict(read_yaml(path, SOURCE))


def config_to_dict(cfg: BalancerConfig) -> dict[str, Any]:
    """Plain-data view of the effective config (for ``/config``)."""
    return to_dict(cfg)
