"""The xDS control plane: ADS (listeners, routes, clusters, endpoints; state of the world) from the balancer's pools.

``modelyard balance`` with ``xds.address`` set serves Envoy's Aggregated Discovery Service, so that

- **Envoy** takes its listener, routes, clusters and endpoints from modelyard instead of a static file
  (its bootstrap names only this server: see ``envoy/xds-bootstrap.yaml``), and
- **proxyless gRPC clients** -- grpcio with an ``xds:///<service_name>`` target and a bootstrap file --
  balance by themselves, with no proxy hop.

What it serves comes from the pools as the balancer sees them: membership from every discovery source
(static, file, DNS, Kubernetes, the admin API -- so the autoscaler's replicas), active health and
outlier ejection (``UNHEALTHY``), drain (``DRAINING``), and weights derived from the latency view
(the picker's estimate per endpoint, and slow start): a client that does its own balancing gets the
balancer's knowledge of which replica is fast. Endpoint weights go both on the endpoint (Envoy) and on a
locality of its own (gRPC weighs localities).

Each resource type has a version (a digest of its resources); a push goes to every stream whose
subscription it changes. ACKs are recorded; a NACK is logged once per version and not retried until
the resources change; unknown types and names are answered with what exists (xDS clients time out
resources that do not); a request that does not parse ends that stream with INVALID_ARGUMENT. One
client's stream never affects another's.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hashlib
import itertools
import logging
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from modelyard.balancer.endpoint import Health
from modelyard.config import Check

if TYPE_CHECKING:
    from modelyard.balancer.config import BalancerConfig
    from modelyard.balancer.pool import Pool

log = logging.getLogger("modelyard.balancer.xds")

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
TYPES = (LISTENER, ROUTE, CLUSTER, ENDPOINT)
#: types whose empty subscription means "all of them" (RDS and EDS are always by name)
WILDCARD_TYPES = (LISTENER, CLUSTER)
ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
DELTA_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"


@dataclass
class XdsConfig:
    """The control plane (off unless ``address`` is set)."""

    #: where ADS is served (host:port, 127.0.0.1 unless told otherwise); null = no control plane
    address: str | None = None
    #: the listener Envoy is told to open for clients (host:port); empty = Envoy gets no listener
    envoy_listener: str = ""
    #: the name proxyless clients dial (``xds:///<service_name>``) and the route configuration's name
    service_name: str = "modelyard"
    #: seconds between refreshes of the endpoint weights from the latency view
    weight_interval: float = 2.0

    def validate(self, check: Check) -> None:
        from modelyard.balancer.config import host_port_ok

        if self.address is not None:
            check(host_port_ok(self.address), "address", f"expected host:port, got {self.address!r}")
        if self.envoy_listener:
            check(host_port_ok(self.envoy_listener), "envoy_listener",
                  f"expected host:port, got {self.envoy_listener!r}")
        check(bool(re.fullmatch(r"[A-Za-z0-9._-]+", self.service_name)), "service_name",
              f"must be a host name, got {self.service_name!r}")
        check(self.weight_interval > 0, "weight_interval", "must be > 0")


# ------------------------------------------------------------------ resources (pure)


def _any(msg: Any) -> Any:
    from google.protobuf import any_pb2

    out = any_pb2.Any()
    out.Pack(msg)
    return out


def glob_regex(pattern: str) -> str:
    """An fnmatch glob as an RE2 regex (no Python-only syntax)."""
    out = []
    for ch in pattern:
        out.append(".*" if ch == "*" else "." if ch == "?" else re.escape(ch))
    return "".join(out)


def route_match(match: Any) -> Any | None:
    """An xDS RouteMatch for a balancer route's match; None when it needs the model name (xDS cannot see it)."""
    from envoy.config.route.v3 import route_components_pb2 as rc
    from envoy.type.matcher.v3 import regex_pb2

    if match.model:
        return None
    service, method = match.service or "*", match.method or "*"
    if service == "*" and method == "*":
        return rc.RouteMatch(prefix="/")
    if "*" not in service and "?" not in service and method == "*":
        return rc.RouteMatch(prefix=f"/{service}/")
    if not set(service + method) & set("*?[") and fnmatch.translate(service):
        return rc.RouteMatch(path=f"/{service}/{method}")
    return rc.RouteMatch(safe_regex=regex_pb2.RegexMatcher(regex=f"/{glob_regex(service)}/{glob_regex(method)}"))


def endpoint_weights(pool: Pool, now: float) -> dict[str, int]:
    """10..100 per routable endpoint: the fastest by the picker's latency estimate (times its slow-start
    weight) gets 100, the others in proportion; endpoints not measured yet get 100."""
    speeds: dict[str, float | None] = {}
    for entry in pool.snapshot.entries:
        ep = entry.endpoint
        est = ep.load.estimate(now) if hasattr(ep.load, "estimate") else None
        speeds[ep.address] = entry.weight / est if est else None
    known = [v for v in speeds.values() if v is not None]
    best = max(known) if known else 0.0
    out = {}
    for addr, speed in speeds.items():
        # quantized to tens so that noise does not push an update every interval
        w = 100 if speed is None or best <= 0 else round(10 * speed / best) * 10
        out[addr] = max(10, min(100, w))
    return out


def build_resources(cfg: BalancerConfig, pools: dict[str, Pool], now: float, client: str) -> dict[str, dict[str, Any]]:
    """Every resource for one kind of client (``"envoy"`` or ``"grpc"``): type URL -> name -> message."""
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, health_check_pb2
    from envoy.config.endpoint.v3 import endpoint_components_pb2 as ec
    from envoy.config.endpoint.v3 import endpoint_pb2
    from envoy.config.listener.v3 import api_listener_pb2, listener_components_pb2, listener_pb2
    from envoy.config.route.v3 import route_components_pb2 as rc
    from envoy.config.route.v3 import route_pb2
    from envoy.extensions.filters.http.router.v3 import router_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
    from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as hpo
    from google.protobuf import duration_pb2, wrappers_pb2

    xcfg = cfg.xds
    name = xcfg.service_name
    ads = config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource(),
                                         resource_api_version=config_source_pb2.V3)

    def manager(prefix: str) -> Any:
        return hcm.HttpConnectionManager(
            stat_prefix=prefix, codec_type=hcm.HttpConnectionManager.AUTO,
            rds=hcm.Rds(config_source=ads, route_config_name=name),
            http_filters=[hcm.HttpFilter(name="envoy.filters.http.router", typed_config=_any(router_pb2.Router()))])

    listeners: dict[str, Any] = {}
    if client == "grpc":
        listeners[name] = listener_pb2.Listener(
            name=name, api_listener=api_listener_pb2.ApiListener(api_listener=_any(manager(name))))
    elif xcfg.envoy_listener:
        host, _, port = xcfg.envoy_listener.rpartition(":")
        listeners[f"{name}-ingress"] = listener_pb2.Listener(
            name=f"{name}-ingress",
            address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address=host.strip("[]"),
                                                                                  port_value=int(port))),
            filter_chains=[listener_components_pb2.FilterChain(filters=[listener_components_pb2.Filter(
                name="envoy.filters.network.http_connection_manager", typed_config=_any(manager("ingress")))])])

    routes = []
    for r in cfg.routes:
        match = route_match(r.match)
        if match is None:
            continue  # model-name routes need the request body: the balancer's own data plane only
        if r.pool is not None:
            action = rc.RouteAction(cluster=r.pool)
        else:
            total = sum(a.weight for a in r.split)
            action = rc.RouteAction(weighted_clusters=rc.WeightedCluster(clusters=[
                rc.WeightedCluster.ClusterWeight(name=a.pool, weight=wrappers_pb2.UInt32Value(
                    value=max(1, round(1000 * a.weight / total)))) for a in r.split if a.weight > 0]))
        # no route timeout of Envoy's own (15 s by default): the client's grpc-timeout is the deadline
        action.timeout.CopyFrom(duration_pb2.Duration())
        action.max_stream_duration.grpc_timeout_header_max.CopyFrom(duration_pb2.Duration())
        routes.append(rc.Route(match=match, route=action))
    route_config = route_pb2.RouteConfiguration(name=name, virtual_hosts=[
        rc.VirtualHost(name=name, domains=["*"], routes=routes)])

    clusters: dict[str, Any] = {}
    assignments: dict[str, Any] = {}
    for pname, pool in pools.items():
        pc = pool.config
        seconds = max(pc.connect_timeout, 0.001)
        cluster = cluster_pb2.Cluster(
            name=pname, type=cluster_pb2.Cluster.EDS,
            eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads, service_name=pname),
            connect_timeout=duration_pb2.Duration(seconds=int(seconds), nanos=int(seconds % 1 * 1e9)),
            lb_policy=cluster_pb2.Cluster.LEAST_REQUEST if client == "envoy" else cluster_pb2.Cluster.ROUND_ROBIN)
        if client == "envoy":
            cluster.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].CopyFrom(
                _any(hpo.HttpProtocolOptions(explicit_http_config=hpo.HttpProtocolOptions.ExplicitHttpConfig(
                    http2_protocol_options={}))))
        clusters[pname] = cluster
        weights = endpoint_weights(pool, now)
        localities = []
        for ep in sorted(pool.endpoints.values(), key=lambda e: e.address):
            host, _, port = ep.address.rpartition(":")
            if ep.draining:
                status = health_check_pb2.DRAINING
            elif ep.address in weights:
                status = health_check_pb2.HEALTHY
            elif ep.health is Health.UNHEALTHY or ep.is_ejected(now):
                status = health_check_pb2.UNHEALTHY
            else:
                status = health_check_pb2.UNKNOWN
            w = wrappers_pb2.UInt32Value(value=weights.get(ep.address, 1))
            localities.append(ec.LocalityLbEndpoints(
                locality=base_pb2.Locality(sub_zone=ep.address), load_balancing_weight=w,
                lb_endpoints=[ec.LbEndpoint(
                    endpoint=ec.Endpoint(address=address_pb2.Address(socket_address=address_pb2.SocketAddress(
                        address=host.strip("[]"), port_value=int(port)))),
                    health_status=status, load_balancing_weight=w)]))
        assignments[pname] = endpoint_pb2.ClusterLoadAssignment(cluster_name=pname, endpoints=localities)
    return {LISTENER: listeners, ROUTE: {name: route_config}, CLUSTER: clusters, ENDPOINT: assignments}


def version_of(resources: dict[str, Any]) -> str:
    """A digest of one type's resources: the same content always has the same version."""
    h = hashlib.sha256()
    for name in sorted(resources):
        h.update(name.encode() + b"\0" + resources[name].SerializeToString(deterministic=True))
    return h.hexdigest()[:16]


# ------------------------------------------------------------------ the server


class Subscription:
    """One stream's interest in one type: names (empty = all, for wildcard types), what was sent, what was acked."""

    __slots__ = ("acked", "nacked", "names", "nonce", "sent")

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.sent: str | None = None
        self.nonce = ""
        self.acked: str | None = None
        self.nacked: str | None = None


class ControlPlane:
    """Serves ADS for a balancer; :meth:`changed` is called whenever a pool's state changes."""

    def __init__(self, cfg: BalancerConfig, pools: dict[str, Pool], clock: Callable[[], float]) -> None:
        self.cfg = cfg
        self.pools = pools
        self.clock = clock
        self.generation = 0
        #: one event per open stream, set on every change
        self._waiters: set[asyncio.Event] = set()
        self._server: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._nonces = itertools.count(1)
        self._cache: dict[str, tuple[int, dict[str, dict[str, Any]], dict[str, str]]] = {}
        self.port: int | None = None
        #: counters for /metrics: streams, pushes, acks, nacks, bad requests
        self.counters: dict[str, int] = {"streams": 0, "pushes": 0, "acks": 0, "nacks": 0, "bad_requests": 0}
        self.streams = 0

    def changed(self) -> None:
        """Pools changed: every stream re-checks its subscriptions (coalesced)."""
        self.generation += 1
        for ev in self._waiters:
            ev.set()

    def resources(self, client: str) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        """(resources, versions) for a kind of client, rebuilt once per change."""
        cached = self._cache.get(client)
        if cached is not None and cached[0] == self.generation:
            return cached[1], cached[2]
        res = build_resources(self.cfg, self.pools, self.clock(), client)
        versions = {t: version_of(r) for t, r in res.items()}
        self._cache[client] = (self.generation, res, versions)
        return res, versions

    async def start(self, address: str) -> int:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "envoy.service.discovery.v3.AggregatedDiscoveryService", {
                "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(self._stream),
                "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(self._delta),
            }),))
        port = server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot listen on {address} for xDS")
        await server.start()
        self._server = server
        self.port = port
        self._tasks.append(asyncio.ensure_future(self._refresh_weights()))
        return port

    async def _refresh_weights(self) -> None:
        """Latency estimates move without any state change: re-check now and then (pushes only on a real change)."""
        while True:
            await asyncio.sleep(self.cfg.xds.weight_interval)
            self.changed()

    async def _delta(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "incremental xDS is not served: use state-of-the-world ADS")
        yield b""  # pragma: no cover - abort raises

    async def _stream(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        from envoy.service.discovery.v3 import discovery_pb2
        from google.protobuf.message import DecodeError

        self.counters["streams"] += 1
        self.streams += 1
        subs: dict[str, Subscription] = {}
        client = "envoy"
        node = ""
        inbox: asyncio.Queue[Any] = asyncio.Queue()

        async def read() -> None:
            try:
                async for raw in requests:
                    await inbox.put(raw)
            finally:
                await inbox.put(None)

        reader = asyncio.ensure_future(read())
        changed = asyncio.Event()
        self._waiters.add(changed)
        try:
            get: asyncio.Future[Any] | None = None
            while True:
                if get is None:
                    get = asyncio.ensure_future(inbox.get())
                change = asyncio.ensure_future(changed.wait())
                done, _ = await asyncio.wait({get, change}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    changed.clear()
                else:
                    change.cancel()
                    raw = get.result()
                    get = None
                    if raw is None:
                        return
                    try:
                        req = discovery_pb2.DiscoveryRequest.FromString(raw)
                    except DecodeError as exc:
                        self.counters["bad_requests"] += 1
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                            f"not a valid envoy.service.discovery.v3.DiscoveryRequest: {exc}")
                    if req.node.id or req.node.user_agent_name:
                        node = req.node.id or node
                        client = "grpc" if "grpc" in req.node.user_agent_name.lower() else "envoy"
                    if not self._on_request(req, subs, node):
                        continue
                res, versions = self.resources(client)
                for type_url, sub in subs.items():
                    chosen = res[type_url] if not sub.names and type_url in WILDCARD_TYPES else \
                        {n: r for n, r in res[type_url].items() if n in sub.names}
                    version = versions[type_url] + ":" + ",".join(sorted(chosen))
                    if version == sub.sent:
                        continue
                    sub.sent = version
                    sub.nonce = str(next(self._nonces))
                    self.counters["pushes"] += 1
                    yield discovery_pb2.DiscoveryResponse(
                        version_info=version, type_url=type_url, nonce=sub.nonce,
                        resources=[_any(r) for r in chosen.values()]).SerializeToString()
        finally:
            self._waiters.discard(changed)
            self.streams -= 1
            reader.cancel()

    def _on_request(self, req: Any, subs: dict[str, Subscription], node: str) -> bool:
        """Record a request; True when the subscription changed (something may have to be sent)."""
        if req.type_url not in TYPES:
            self.counters["bad_requests"] += 1
            log.info("xDS client %s asked for unknown type %s: nothing served for it", node, req.type_url)
            return False
        sub = subs.get(req.type_url)
        if sub is None:
            sub = subs[req.type_url] = Subscription()
        elif req.response_nonce and req.response_nonce != sub.nonce:
            return False  # an answer to an older response: the newer one will be answered too
        if req.response_nonce:
            if req.HasField("error_detail"):
                self.counters["nacks"] += 1
                if sub.nacked != req.version_info:
                    sub.nacked = req.version_info
                    log.warning("xDS client %s rejected %s version %s: %s", node, req.type_url.rsplit(".", 1)[-1],
                                sub.sent, req.error_detail.message)
            else:
                self.counters["acks"] += 1
                sub.acked = req.version_info
        names = set(req.resource_names) - {"*"}
        if names != sub.names or sub.sent is None:
            sub.names = names
            sub.sent = None  # (re)send for these names
            return True
        return False

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self._server is not None:
            await self._server.stop(0)
