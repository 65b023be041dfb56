"""Proxyless mode: the client balances by itself over a pool's replicas, with the balancer's own pickers.

    InferenceClient("xds://127.0.0.1:18000/text")        # control plane at 127.0.0.1:18000, pool "text"

The replicas come from modelyard's xDS control plane (``modelyard balance`` with ``xds.address``): a
background thread subscribes to the pool's endpoints (EDS, state of the world) and keeps them -- with
their health, drain and weights -- in a :class:`~modelyard.balancer.pool.Pool`. Every call picks a
replica with the pool's picker (``least_latency`` unless ``?picker=`` says otherwise), goes straight to
it on a channel of its own, and tells the picker how it went: there is no proxy hop, and the picker
learns from this client's own latencies. A streaming call picks once, at its start.

(``xds:///name``, with an empty authority, is grpcio's own xDS resolver and is passed to grpc as is.)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import grpc

log = logging.getLogger("modelyard.clients")

ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"


def is_proxyless(url: str) -> bool:
    """``xds://HOST:PORT/POOL`` (our control plane), not grpc's own ``xds:///NAME``."""
    return url.startswith("xds://") and not url.startswith("xds:///")


def parse_url(url: str) -> tuple[str, str, str]:
    """(control plane host:port, pool, picker) of a proxyless URL."""
    parts = urlsplit(url)
    pool = parts.path.strip("/")
    if not parts.netloc or not pool:
        raise ValueError(f"proxyless URL must be xds://HOST:PORT/POOL, got {url!r}")
    picker = parse_qs(parts.query).get("picker", ["least_latency"])[0]
    return parts.netloc, pool, picker


class Resolver:
    """Keeps a pool's endpoints from the control plane (a daemon thread with its own ADS stream)."""

    def __init__(self, control_plane: str, pool_name: str, picker: str = "least_latency",
                 node_id: str = "modelyard-client") -> None:
        from modelyard.balancer.config import HealthCheckConfig, PoolConfig
        from modelyard.balancer.pool import Pool

        self.control_plane = control_plane
        self.name = pool_name
        self.node_id = node_id
        # the pool's own picker and accounting; health comes from the control plane, not from checks here
        self.pool = Pool(pool_name, PoolConfig(picker=picker, health_check=HealthCheckConfig(enabled=False)))
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._channel: grpc.Channel | None = None
        self._thread = threading.Thread(target=self._run, name=f"xds-{pool_name}", daemon=True)
        self._thread.start()

    def _requests(self, acks: list[Any]) -> Iterator[Any]:
        from envoy.config.core.v3 import base_pb2
        from envoy.service.discovery.v3 import discovery_pb2

        node = base_pb2.Node(id=self.node_id, user_agent_name="modelyard-client")
        yield discovery_pb2.DiscoveryRequest(node=node, type_url=ENDPOINT_TYPE, resource_names=[self.name])
        sent = 0
        while not self._stop.is_set():
            if len(acks) > sent:
                version, nonce = acks[sent]
                sent += 1
                yield discovery_pb2.DiscoveryRequest(node=node, type_url=ENDPOINT_TYPE, resource_names=[self.name],
                                                     version_info=version, response_nonce=nonce)
            else:
                time.sleep(0.01)

    def _run(self) -> None:
        from envoy.config.endpoint.v3 import endpoint_pb2
        from envoy.service.discovery.v3 import discovery_pb2

        backoff = 0.1
        while not self._stop.is_set():
            acks: list[Any] = []
            try:
                self._channel = grpc.insecure_channel(self.control_plane)
                ads = self._channel.stream_stream(
                    ADS_METHOD, request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
                    response_deserializer=discovery_pb2.DiscoveryResponse.FromString)
                for response in ads(self._requests(acks)):
                    for res in response.resources:
                        cla = endpoint_pb2.ClusterLoadAssignment()
                        res.Unpack(cla)
                        if cla.cluster_name == self.name:
                            self._apply(cla)
                    acks.append((response.version_info, response.nonce))
                    self.ready.set()
                    backoff = 0.1
            except grpc.RpcError as exc:
                if self._stop.is_set():
                    return
                log.warning("proxyless: control plane %s: %s; retrying", self.control_plane, exc.code().name)
            finally:
                if self._channel is not None:
                    self._channel.close()
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 5.0)

    def _apply(self, cla: Any) -> None:
        """Membership, drain and health from one ClusterLoadAssignment."""
        from modelyard.balancer.endpoint import Health

        members, states = [], {}
        for locality in cla.endpoints:
            for lb in locality.lb_endpoints:
                sa = lb.endpoint.address.socket_address
                addr = f"[{sa.address}]:{sa.port_value}" if ":" in sa.address else f"{sa.address}:{sa.port_value}"
                weight = lb.load_balancing_weight.value or locality.load_balancing_weight.value or 1
                members.append((addr, float(weight)))
                states[addr] = lb.health_status
        with self.lock:
            self.pool.set_source("xds", members)
            for addr, status in states.items():
                self.pool.set_draining(addr, status == 3)  # DRAINING
                self.pool.set_health(addr, Health.UNHEALTHY if status == 2 else Health.HEALTHY)

    def close(self) -> None:
        self._stop.set()
        if self._channel is not None:
            self._channel.close()


class _Picked:
    """Books of one call on one endpoint."""

    __slots__ = ("ep", "inflight", "t0")

    def __init__(self, ep: Any) -> None:
        self.ep = ep
        self.inflight = ep.outstanding
        ep.outstanding += 1
        self.t0 = time.monotonic()


class ProxylessChannel:
    """Enough of a grpc (sync or aio) Channel for generated stubs: each call goes to a replica the picker chooses."""

    def __init__(self, url: str, open_channel: Callable[[str], Any], aio: bool, wait_ready: float = 10.0) -> None:
        control_plane, pool, picker = parse_url(url)
        self.resolver = Resolver(control_plane, pool, picker)
        self._open = open_channel
        self._aio = aio
        self._channels: dict[str, Any] = {}
        if not self.resolver.ready.wait(wait_ready):
            log.warning("proxyless: no endpoints from %s within %.0fs (calls fail until some arrive)",
                        control_plane, wait_ready)

    # ------------------------------------------------------------------ picking

    def _pick(self) -> _Picked:
        from modelyard.balancer.endpoint import NoEndpoint

        r = self.resolver
        with r.lock:
            try:
                ep = r.pool.picker.pick(r.pool.snapshot)
            except NoEndpoint as exc:
                raise _unavailable(str(exc)) from None
            return _Picked(ep)

    def _done(self, picked: _Picked, error: grpc.RpcError | None) -> None:
        from modelyard.balancer.endpoint import Outcome

        code = error.code() if error is not None else grpc.StatusCode.OK
        if code == grpc.StatusCode.OK:
            outcome = Outcome.SUCCESS
        elif code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            outcome = Outcome.FAILURE
        else:
            outcome = Outcome.APP_ERROR
        r = self.resolver
        with r.lock:
            picked.ep.outstanding -= 1
            r.pool.record(picked.ep, outcome, time.monotonic() - picked.t0, code.name, picked.inflight)

    def _channel(self, address: str) -> Any:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = self._open(address)
        return ch

    # ------------------------------------------------------------------ the Channel surface stubs use

    def unary_unary(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                    **kw: Any) -> Any:
        def call_on(address: str) -> Any:
            return self._channel(address).unary_unary(method, request_serializer, response_deserializer)

        if self._aio:
            async def aio_call(request: Any, **kwargs: Any) -> Any:
                picked = self._pick()
                try:
                    response = await call_on(picked.ep.address)(request, **kwargs)
                except grpc.RpcError as exc:
                    self._done(picked, exc)
                    raise
                self._done(picked, None)
                return response
            return aio_call

        def sync_call(request: Any, **kwargs: Any) -> Any:
            picked = self._pick()
            try:
                response = call_on(picked.ep.address)(request, **kwargs)
            except grpc.RpcError as exc:
                self._done(picked, exc)
                raise
            self._done(picked, None)
            return response
        return sync_call

    def _streaming(self, kind: str, method: str, request_serializer: Any, response_deserializer: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            picked = self._pick()
            try:
                multi = getattr(self._channel(picked.ep.address), kind)(method, request_serializer,
                                                                        response_deserializer)
                return multi(*args, **kwargs)
            finally:  # a stream is counted at its start: its latency says nothing about one request
                r = self.resolver
                with r.lock:
                    picked.ep.outstanding -= 1
        return call

    def unary_stream(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                     **kw: Any) -> Any:
        return self._streaming("unary_stream", method, request_serializer, response_deserializer)

    def stream_unary(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                     **kw: Any) -> Any:
        return self._streaming("stream_unary", method, request_serializer, response_deserializer)

    def stream_stream(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                      **kw: Any) -> Any:
        return self._streaming("stream_stream", method, request_serializer, response_deserializer)

    def close(self) -> Any:
        self.resolver.close()
        channels, self._channels = list(self._channels.values()), {}
        if self._aio:
            async def close_all() -> None:
                for ch in channels:
                    await ch.close()
            return close_all()
        for ch in channels:
            ch.close()
        return None


class _Unavailable(grpc.RpcError):
    """No replica to pick: UNAVAILABLE, as a channel with no ready subchannel says."""

    def __init__(self, details: str) -> None:
        super().__init__(details)
        self._details = details

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self._details


def _unavailable(details: str) -> grpc.RpcError:
    return _Unavailable(details)
