"""Balancer configuration: dataclasses with documented defaults and one validating loader.

``load_config(path)`` / ``config_from_dict(data)`` check the whole document and raise
:class:`ConfigError` listing every problem with its path (``pools.cpu.retry.max_attempts:
must be >= 1``), so a bad file is refused at start with all its errors at once.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from modelyard.balancer.outlier import OutlierConfig
from modelyard.balancer.pickers import PICKERS
from modelyard.balancer.retry import RetryConfig


class ConfigError(ValueError):
    """An invalid configuration; ``errors`` holds one ``path: message`` line per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("invalid balancer config:\n  " + "\n  ".join(errors))
        self.errors = errors


@dataclass
class ListenerConfig:
    """A gRPC listening address of the proxy."""

    address: str = "127.0.0.1:9001"
    name: str = "main"


@dataclass
class AdminConfig:
    """The admin HTTP server (metrics, endpoints, drain); ``address: null`` disables it."""

    address: str | None = "127.0.0.1:9901"


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


@dataclass
class SlowStartConfig:
    """Ramp a new endpoint's weight over ``window`` seconds (0 disables), Envoy style."""

    window: float = 0.0
    aggression: float = 1.0
    min_weight_percent: float = 10.0


@dataclass
class CircuitBreakerConfig:
    """Per-pool limits; over a limit the request fails at once with RESOURCE_EXHAUSTED."""

    #: requests in flight to the pool
    max_requests: int = 10000
    #: requests in flight whose connection was not yet ready when sent
    max_pending: int = 1024
    #: retries in flight
    max_retries: int = 64


@dataclass
class StaticEndpoint:
    """One endpoint written in the config; a bare ``host:port`` string also works."""

    address: str = ""
    weight: float = 1.0


@dataclass
class DnsConfig:
    """Re-resolve ``name`` every ``interval`` seconds; each A/AAAA record is an endpoint."""

    name: str = ""
    port: int = 8001
    interval: float = 5.0


@dataclass
class KubernetesConfig:
    """Watch the EndpointSlices of ``service`` (label kubernetes.io/service-name)."""

    service: str = ""
    namespace: str = "default"
    #: port name in the slice; empty = the first port
    port_name: str = ""
    #: API server URL (no auth); empty = the in-cluster service-account config
    api_server: str = ""


@dataclass
class EndpointsConfig:
    """Where a pool's endpoints come from; several sources may be combined."""

    static: list[StaticEndpoint] = field(default_factory=list)
    #: JSON or YAML file with a list of addresses or {address, weight}; reloaded on change
    file: str | None = None
    file_poll_interval: float = 1.0
    dns: DnsConfig | None = None
    kubernetes: KubernetesConfig | None = None


@dataclass
class PoolConfig:
    """A set of interchangeable upstream endpoints and how to balance over them."""

    picker: str = "peak_ewma"
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


@dataclass
class RouteConfig:
    """First matching route wins; it sends to ``pool`` or to a weighted ``split`` of pools."""

    match: RouteMatch = field(default_factory=RouteMatch)
    pool: str | None = None
    split: list[WeightedPool] = field(default_factory=list)


@dataclass
class DrainConfig:
    """Shutdown: report NOT_SERVING for ``delay`` s, then stop accepting, wait ``grace`` s for in-flight."""

    delay: float = 0.0
    grace: float = 30.0


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
    max_message_bytes: int = 256 * 1024 * 1024
    drain: DrainConfig = field(default_factory=DrainConfig)


# --------------------------------------------------------------------------- loading

_SCALARS = (bool, int, float, str)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, path: str, errors: list[str]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if len(args) == 1:
            return _convert(args[0], value, path, errors)
        for a in args:  # e.g. str | None handled above; no other unions used
            if isinstance(value, a):
                return value
        errors.append(f"{path}: expected {' or '.join(_type_name(a) for a in args)}")
        return None
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list")
            return []
        return [_convert(item, v, f"{path}[{i}]", errors) for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(tp)
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping")
            return {}
        if item is Any:
            return dict(value)
        return {str(k): _convert(item, v, f"{path}.{k}", errors) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if tp is StaticEndpoint and isinstance(value, str):
            value = {"address": value}
        return _from_dict(tp, value, path, errors)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            errors.append(f"{path}: expected a number, got {value!r}")
            return 0.0
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{path}: expected an integer, got {value!r}")
            return 0
        return value
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{path}: expected true or false, got {value!r}")
            return False
        return value
    if tp is str:
        if not isinstance(value, str):
            errors.append(f"{path}: expected a string, got {value!r}")
            return ""
        return value
    raise TypeError(f"unsupported config type {tp!r}")


def _from_dict(cls: Any, data: Any, path: str, errors: list[str]) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        errors.append(f"{path or '<root>'}: expected a mapping")
        return cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            errors.append(f"{path + '.' if path else ''}{key}: unknown field (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _convert(hints[f.name], data[f.name], f"{path + '.' if path else ''}{f.name}", errors)
    return cls(**kwargs)


def host_port_ok(address: str) -> bool:
    """``host:port`` with a port number in range."""
    host, sep, port = address.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 <= int(port) < 65536)


def _validate(cfg: BalancerConfig, errors: list[str]) -> None:
    def need(ok: bool, path: str, msg: str) -> None:
        if not ok:
            errors.append(f"{path}: {msg}")

    need(bool(cfg.listeners), "listeners", "at least one listener is required")
    for i, lst in enumerate(cfg.listeners):
        need(host_port_ok(lst.address), f"listeners[{i}].address", f"expected host:port, got {lst.address!r}")
    if cfg.admin.address is not None:
        need(host_port_ok(cfg.admin.address), "admin.address", f"expected host:port, got {cfg.admin.address!r}")
    need(cfg.workers >= 1, "workers", "must be >= 1")
    need(cfg.max_message_bytes > 0, "max_message_bytes", "must be > 0")
    need(cfg.drain.delay >= 0, "drain.delay", "must be >= 0")
    need(cfg.drain.grace >= 0, "drain.grace", "must be >= 0")
    for m in cfg.unary_methods:
        need(m.startswith("/") and m.count("/") == 2, "unary_methods", f"expected /package.Service/Method, got {m!r}")
    need(bool(cfg.pools), "pools", "at least one pool is required")
    for name, p in cfg.pools.items():
        at = f"pools.{name}"
        if p.picker not in PICKERS:
            errors.append(f"{at}.picker: unknown picker {p.picker!r} (known: {', '.join(sorted(PICKERS))})")
        else:
            try:
                PICKERS[p.picker](**p.picker_options)
            except (TypeError, ValueError) as exc:
                errors.append(f"{at}.picker_options: {exc}")
        need(p.channels_per_endpoint >= 1, f"{at}.channels_per_endpoint", "must be >= 1")
        need(p.connect_timeout > 0, f"{at}.connect_timeout", "must be > 0")
        need(p.timeout is None or p.timeout > 0, f"{at}.timeout", "must be > 0")
        need(0 <= p.panic_threshold <= 100, f"{at}.panic_threshold", "must be within 0..100")
        ep = p.endpoints
        for i, s in enumerate(ep.static):
            need(host_port_ok(s.address), f"{at}.endpoints.static[{i}].address", f"expected host:port, got {s.address!r}")
            need(s.weight > 0, f"{at}.endpoints.static[{i}].weight", "must be > 0")
        need(ep.file_poll_interval > 0, f"{at}.endpoints.file_poll_interval", "must be > 0")
        if ep.dns is not None:
            need(bool(ep.dns.name), f"{at}.endpoints.dns.name", "is required")
            need(0 < ep.dns.port < 65536, f"{at}.endpoints.dns.port", "must be a port number")
            need(ep.dns.interval > 0, f"{at}.endpoints.dns.interval", "must be > 0")
        if ep.kubernetes is not None:
            need(bool(ep.kubernetes.service), f"{at}.endpoints.kubernetes.service", "is required")
        hc = p.health_check
        need(hc.interval > 0, f"{at}.health_check.interval", "must be > 0")
        need(hc.timeout > 0, f"{at}.health_check.timeout", "must be > 0")
        need(hc.healthy_threshold >= 1, f"{at}.health_check.healthy_threshold", "must be >= 1")
        need(hc.unhealthy_threshold >= 1, f"{at}.health_check.unhealthy_threshold", "must be >= 1")
        od = p.outlier_detection
        need(od.consecutive_failures >= 1, f"{at}.outlier_detection.consecutive_failures", "must be >= 1")
        need(od.base_ejection_time > 0, f"{at}.outlier_detection.base_ejection_time", "must be > 0")
        need(od.max_ejection_time >= od.base_ejection_time, f"{at}.outlier_detection.max_ejection_time",
             "must be >= base_ejection_time")
        need(0 <= od.max_ejection_percent <= 100, f"{at}.outlier_detection.max_ejection_percent", "must be within 0..100")
        ss = p.slow_start
        need(ss.window >= 0, f"{at}.slow_start.window", "must be >= 0")
        need(ss.aggression > 0, f"{at}.slow_start.aggression", "must be > 0")
        need(0 < ss.min_weight_percent <= 100, f"{at}.slow_start.min_weight_percent", "must be within (0, 100]")
        cb = p.circuit_breakers
        for k in ("max_requests", "max_pending", "max_retries"):
            need(getattr(cb, k) >= 0, f"{at}.circuit_breakers.{k}", "must be >= 0")
        r = p.retry
        need(r.max_attempts >= 1, f"{at}.retry.max_attempts", "must be >= 1")
        need(r.budget_ratio >= 0, f"{at}.retry.budget_ratio", "must be >= 0")
        need(r.min_retries_per_second >= 0, f"{at}.retry.min_retries_per_second", "must be >= 0")
        need(r.budget_ttl > 0, f"{at}.retry.budget_ttl", "must be > 0")
        need(0 <= r.base_backoff <= r.max_backoff, f"{at}.retry.base_backoff", "must be within 0..max_backoff")
    if not cfg.routes and len(cfg.pools) > 1:
        errors.append("routes: required when there is more than one pool")
    for i, r in enumerate(cfg.routes):
        at = f"routes[{i}]"
        if (r.pool is None) == (not r.split):
            errors.append(f"{at}: exactly one of pool or split is required")
        if r.pool is not None and r.pool not in cfg.pools:
            errors.append(f"{at}.pool: unknown pool {r.pool!r}")
        for j, arm in enumerate(r.split):
            if arm.pool not in cfg.pools:
                errors.append(f"{at}.split[{j}].pool: unknown pool {arm.pool!r}")
            need(arm.weight >= 0, f"{at}.split[{j}].weight", "must be >= 0")
        if r.split and sum(a.weight for a in r.split) <= 0:
            errors.append(f"{at}.split: weights must add up to more than 0")


def config_from_dict(data: Any) -> BalancerConfig:
    """Build and validate a config from parsed YAML/JSON; raise :class:`ConfigError` with every error."""
    errors: list[str] = []
    cfg = _from_dict(BalancerConfig, data, "", errors)
    if not errors:
        _validate(cfg, errors)
    else:
        # still report semantic errors of the parts that parsed
        try:
            _validate(cfg, errors)
        except Exception:  # a half-built config may not be walkable; the type errors suffice
            pass
    if errors:
        raise ConfigError(errors)
    if not cfg.routes:
        cfg.routes = [RouteConfig(pool=next(iter(cfg.pools)))]
    return cfg


def load_config(path: str | Path) -> BalancerConfig:
    """Read a YAML (or JSON) config file; raise :class:`ConfigError` listing every problem."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError([f"{path}: {exc.strerror}"]) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {exc}"]) from exc
    return config_from_dict(data)


def config_to_dict(cfg: BalancerConfig) -> dict[str, Any]:
    """Plain-data view of the effective config (for ``/config``)."""
    return dataclasses.asdict(cfg)
