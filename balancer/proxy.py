"""The data plane: a service-agnostic gRPC proxy that relays HTTP/2 streams, bytes untouched.

Each downstream stream becomes a :class:`Call`: headers are decoded (HPACK, cached),
the route is resolved from ``:path`` (and, for model-routed methods, the model name
peeked from the first DATA bytes), the pool's picker chooses an endpoint, and the
stream is re-opened on one of that endpoint's HTTP/2 connections. DATA frames are
relayed as they arrive in both directions, with end-to-end flow control; response
headers and trailers are re-encoded unchanged. gRPC messages are never parsed,
buffered whole or copied into Python objects beyond the frame payloads.

Why not grpc.aio on both sides (the first version): every proxied call then paid a
grpc.aio server call plus a client call -- two C-core call objects, two Python
coroutines and their completion-queue round trips -- which capped one process at
~3,500 calls/s on this machine. Relaying frames on asyncio protocols costs a fraction
of that, and works for every call kind without knowing which it is.

Retries: unary methods (the inference service's, health Check, and ``unary_methods``)
keep their request bytes until response headers arrive; a connect failure, a refused
or reset stream, a lost connection, or a trailers-only UNAVAILABLE before any
response byte is retried on another endpoint, within the retry budget, the retry
circuit breaker and the deadline. Deadlines: ``grpc-timeout`` is replaced by the time
remaining (min with the pool timeout) on every attempt, and the proxy enforces it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from typing import Any

from modelyard.balancer.endpoint import Endpoint, NoEndpoint, Outcome
from modelyard.balancer.h2.connection import (
    CANCEL,
    NO_ERROR,
    PREFACE,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    S_MAX_CONCURRENT_STREAMS,
    Flusher,
    H2Connection,
    H2ProtocolError,
    Stream,
)
from modelyard.balancer.h2.hpack import Headers, encode, encode_field
from modelyard.balancer.pool import Pool
from modelyard.balancer.retry import backoff
from modelyard.balancer.routing import Router
from modelyard.clock import MONOTONIC, Clock

log = logging.getLogger("modelyard.balancer.proxy")

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
#: serialized grpc.health.v1.HealthCheckResponse{status: NOT_SERVING}
NOT_SERVING_RESPONSE = b"\x08\x02"

OK, CANCELLED, UNKNOWN, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED = 0, 1, 2, 4, 8
UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS = 12, 13, 14, 15
CODE_NAMES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
              "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
              "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")
#: codes that say the endpoint (not the request) is bad: outlier detection and the EWMA penalty
FAILURE_CODES = frozenset({UNAVAILABLE, INTERNAL, UNKNOWN, DATA_LOSS})

#: most downstream streams one connection may have open (advertised in SETTINGS)
MAX_CONCURRENT_STREAMS = 4096
#: unary request bytes kept for a retry; bigger requests are not retried
RETRY_BUFFER_BYTES = 4 << 20

#: RFC 7540 8.1.2.2: connection-specific headers, never forwarded
HOP_HEADERS = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade",
                         b"te", b"host"})

_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def default_unary_methods() -> set[str]:
    """Unary methods of the services we know (inference, health) from their descriptors."""
    from modelyard.protos import grpc_service_pb2

    out = {HEALTH_CHECK}
    for svc in grpc_service_pb2.DESCRIPTOR.services_by_name.values():
        for m in svc.methods:
            if not m.client_streaming and not m.server_streaming:
                out.add(f"/{svc.full_name}/{m.name}")
    return out


def parse_timeout(value: bytes) -> float | None:
    """``grpc-timeout`` (e.g. ``100m``) in seconds; None when malformed."""
    unit = _TIMEOUT_UNITS.get(value[-1:])
    digits = value[:-1]
    if unit is None or not digits.isdigit() or len(digits) > 8:
        return None
    return int(digits) * unit


def timeout_field(seconds: float) -> bytes:
    """An encoded ``grpc-timeout`` header field for ``seconds`` (at most 8 digits)."""
    us = max(1, int(seconds * 1e6))
    value = f"{us}u" if us < 100_000_000 else f"{max(1, int(seconds * 1e3))}m" if seconds < 99_999 else \
        f"{min(99_999_999, int(seconds))}S"
    return encode_field((b"grpc-timeout", value.encode()))


def percent_encode(message: str) -> bytes:
    """grpc-message encoding: printable ASCII except '%' as is, everything else %XX."""
    out = bytearray()
    for b in message.encode():
        if 0x20 <= b <= 0x7E and b != 0x25:
            out.append(b)
        else:
            out += b"%%%02X" % b
    return bytes(out)


def status_block(code: int, message: str, trailers_only: bool) -> bytes:
    fields = [(b"grpc-status", str(code).encode())]
    if message:
        fields.append((b"grpc-message", percent_encode(message)))
    if trailers_only:
        fields = [(b":status", b"200"), (b"content-type", b"application/grpc"), *fields]
    return encode(tuple(fields))


def grpc_status(headers: Headers) -> int:
    for k, v in headers:
        if k == b"grpc-status":
            try:
                return int(v)
            except ValueError:
                return UNKNOWN
    return UNKNOWN


class RequestHead:
    """What the proxy needs from a request's headers; cached per header list (without a timeout)."""

    __slots__ = ("block", "error", "has_authority", "method", "path", "timeout")

    def __init__(self, headers: Headers) -> None:
        self.error: tuple[bytes, str] | None = None
        self.timeout: float | None = None
        path = verb = ctype = authority = b""
        scheme = b"http"
        rest: list[tuple[bytes, bytes]] = []
        for k, v in headers:
            if k[:1] == b":":
                if k == b":path":
                    path = v
                elif k == b":method":
                    verb = v
                elif k == b":authority":
                    authority = v
                elif k == b":scheme":
                    scheme = v
            elif k == b"grpc-timeout":
                self.timeout = parse_timeout(v)
            elif k == b"content-type":
                ctype = v
                rest.append((k, v))
            elif k not in HOP_HEADERS:
                rest.append((k, v))
        self.path = path
        self.method = path.decode("utf-8", "replace")
        if verb != b"POST":
            self.error = (b"405", f"gRPC needs POST, not {verb.decode('latin-1') or 'nothing'}")
        elif not ctype.startswith(b"application/grpc"):
            self.error = (b"415", f"content-type {ctype.decode('latin-1')!r} is not application/grpc")
        elif not path.startswith(b"/"):
            self.error = (b"400", "missing :path")
        fields = [(b":method", b"POST"), (b":scheme", scheme), (b":path", path)]
        #: without one, the attempt adds the endpoint's address (grpc C-core servers reset such streams)
        self.has_authority = bool(authority)
        if authority:
            fields.append((b":authority", authority))
        fields.append((b"te", b"trailers"))
        self.block = b"".join([encode_field(h) for h in (*fields, *rest)])


class DownstreamConnection(H2Connection):
    """The server side of one client connection."""

    transport: Any
    last_peer_stream: int

    local_settings = {**H2Connection.local_settings, S_MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS}

    def __init__(self, proxy: Proxy) -> None:
        super().__init__(proxy.flusher)
        self.proxy = proxy
        self._preface = b""
        self._preface_done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._start_transport(transport)
        self.proxy.connections.add(self)
        self.write(self._open_frames())
        if self.proxy.draining_connections:
            self.send_goaway()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.proxy.connections.discard(self)
        streams = list(self.streams.values())
        self.streams.clear()
        for st in streams:
            if st.call is not None:
                st.call.downstream_cancelled()

    def _receive(self, data: bytes) -> None:
        if not self._preface_done:
            have = self._preface + data
            if len(have) < len(PREFACE):
                if not PREFACE.startswith(have):
                    self._refuse_non_h2(have)
                self._preface = have
                return
            if not have.startswith(PREFACE):
                self._refuse_non_h2(have)
                return
            self._preface_done = True
            self._preface = b""
            data = have[len(PREFACE):]
            if not data:
                return
        super()._receive(data)

    def _refuse_non_h2(self, data: bytes) -> None:
        self.closed = True
        if self.transport is None:
            return
        if data[:8].split(b" ")[0] in (b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS", b"PATCH"):
            body = b"this is a gRPC endpoint (HTTP/2 with prior knowledge)\n"
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\nconnection: close\r\n"
                                 b"content-length: %d\r\n\r\n%s" % (len(body), body))
        self.transport.close()

    def on_headers(self, sid: int, headers: Headers, end_stream: bool) -> None:
        st = self.streams.get(sid)
        if st is not None:  # request trailers: gRPC has none; treat as the end of the request
            if end_stream:
                st.remote_closed = True
                if st.call is not None:
                    st.call.downstream_data(b"", True)
                self._remote_close(st)
            return
        if sid % 2 == 0:
            raise H2ProtocolError(PROTOCOL_ERROR, f"client stream id {sid} is even")
        if sid <= self.last_peer_stream:
            return  # trailers or a late frame on a stream we already ended (RFC 7540 5.1): ignore
        self.last_peer_stream = sid
        st = Stream(sid, self)
        self.streams[sid] = st
        if end_stream:
            st.remote_closed = True
        if self.goaway_sent or len(self.streams) > MAX_CONCURRENT_STREAMS:
            self.reset(st, REFUSED_STREAM)
            return
        self.proxy.new_call(st, headers, end_stream)

    def on_data(self, st: Stream, data: bytes, end_stream: bool) -> None:
        call = st.call
        if call is not None:
            call.downstream_data(data, end_stream)

    def on_reset(self, st: Stream, code: int) -> None:
        if st.call is not None:
            st.call.downstream_cancelled()

    def stream_closed(self, st: Stream) -> None:
        st.call = None
        if self.goaway_sent and not self.streams and self.proxy.draining_connections:
            self.close()

    def respond_http(self, st: Stream, status: bytes, message: str) -> None:
        """A plain HTTP error for a request that is not gRPC."""
        self.send_headers(st, encode(((b":status", status), (b"content-type", b"text/plain"))), False)
        self.send_data(st, message.encode() + b"\n", True)
        if not st.remote_closed:
            self.reset(st, NO_ERROR)


class Call:
    """One proxied call: a downstream stream, the current upstream attempt, retries, deadline."""

    __slots__ = ("attempt", "buffered", "buffered_bytes", "deadline", "down", "ep", "exclude", "finished", "head",
                 "is_retry", "pending", "pool", "proxy", "req_done", "resolve", "resp_started", "retryable", "start",
                 "t0", "timer", "up")

    def __init__(self, proxy: Proxy, down: Stream, head: RequestHead, req_done: bool) -> None:
        self.proxy = proxy
        self.down = down
        self.head = head
        self.up: Stream | None = None
        self.pool: Pool | None = None
        self.ep: Endpoint | None = None
        self.exclude: Endpoint | None = None
        self.attempt = 0
        self.is_retry = False
        self.pending = False
        #: request bytes not yet sent upstream, or kept for a retry
        self.buffered: list[bytes] | None = []
        self.buffered_bytes = 0
        self.req_done = req_done
        self.resp_started = False
        #: unary method: request bytes are kept for a retry until response headers arrive
        self.retryable = head.path in proxy.unary_methods
        self.finished = False
        self.resolve: Callable[[bytes | None], str | None] | None = None
        self.deadline: float | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.start = 0.0
        self.t0 = 0.0

    # ------------------------------------------------------------------ downstream events

    def downstream_data(self, data: bytes, end: bool) -> None:
        """Request bytes from the client.

        Window credit: a retryable call keeps its bytes, so the client is credited when they are
        buffered and attempts send them without crediting again (a replay must not credit twice);
        any other call is credited when its bytes are written upstream (end-to-end back-pressure).
        """
        if end:
            self.req_done = True
        up = self.up
        if up is not None:
            up.conn.send_data(up, data, end)
            if not self.retryable:
                return
        elif self.finished:
            return
        buf = self.buffered
        if buf is None:
            return
        buf.append(data)
        self.buffered_bytes += len(data)
        if self.retryable:
            down = self.down
            down.conn.consumed(down, len(data))
            if self.buffered_bytes > RETRY_BUFFER_BYTES:  # too big to keep: no retry, credit on send
                self.retryable = False
                if up is not None:
                    self.buffered = None
                    up.source = down
        if self.resolve is not None:
            self.proxy.try_route(self)

    def downstream_cancelled(self) -> None:
        if self.finished:
            return
        up = self.up
        if up is not None:
            up.conn.reset(up, CANCEL)
            self.end_attempt(Outcome.APP_ERROR, "CANCELLED")
        self.finish()

    # ------------------------------------------------------------------ upstream events

    def upstream_headers(self, headers: Headers, end: bool) -> None:
        if self.finished:
            return
        down = self.down
        if not end:
            self.resp_started = True
            self.buffered = None  # no retry from here on: later request bytes are credited as they are sent
            up = self.up
            if up is not None:
                up.source = down
            down.conn.send_headers(down, encode(headers), False)
            return
        code = grpc_status(headers)
        if code == UNAVAILABLE and not self.resp_started:
            self.end_attempt(Outcome.FAILURE, "UNAVAILABLE")
            if self.proxy.retry(self):
                return
        else:
            self.end_attempt(Outcome.SUCCESS if code == OK else Outcome.FAILURE if code in FAILURE_CODES
                             else Outcome.APP_ERROR, CODE_NAMES[code] if 0 <= code < 17 else "UNKNOWN")
        down.conn.send_headers(down, encode(headers), True)
        self.finish()

    def upstream_data(self, data: bytes, end: bool) -> None:
        if self.finished:
            return
        down = self.down
        down.conn.send_data(down, data, False)
        if end:  # a gRPC response always ends with trailers
            address = self.ep.address if self.ep else "?"
            self.end_attempt(Outcome.FAILURE, "INTERNAL")
            self.fail(INTERNAL, f"upstream {address} ended the response without trailers")

    def upstream_failed(self, reason: str) -> None:
        """Connect failure, lost connection, RST_STREAM or GOAWAY for the current attempt."""
        if self.finished or self.up is None:
            return
        self.attempt_failed(reason)

    def attempt_failed(self, reason: str) -> None:
        self.end_attempt(Outcome.FAILURE, "UNAVAILABLE")
        if not self.resp_started and self.proxy.retry(self):
            return
        self.fail(UNAVAILABLE, reason)

    def on_deadline(self) -> None:
        self.timer = None
        if self.finished:
            return
        up = self.up
        if up is not None:
            up.conn.reset(up, CANCEL)
            self.end_attempt(Outcome.APP_ERROR, "DEADLINE_EXCEEDED")
        self.fail(DEADLINE_EXCEEDED, "deadline exceeded at the balancer")

    # ------------------------------------------------------------------ ends

    def end_attempt(self, outcome: Outcome, code: str) -> None:
        ep, pool = self.ep, self.pool
        up = self.up
        if up is not None:
            up.call = None
            self.up = None
            if not (up.local_closed and up.remote_closed):
                up.conn.reset(up, CANCEL)  # the call is over; the upstream must not wait for more
        if ep is None or pool is None:
            return
        self.ep = None
        self.exclude = ep
        ep.outstanding -= 1
        if self.pending:
            pool.pending -= 1
            self.pending = False
        if self.is_retry:
            pool.active_retries -= 1
            self.is_retry = False
        pool.record(ep, outcome, self.proxy.clock.now() - self.t0, code)

    def fail(self, code: int, message: str) -> None:
        """End the call with ``code`` (trailers-only unless response headers went out)."""
        if self.finished:
            return
        down = self.down
        down.conn.send_headers(down, status_block(code, message, not self.resp_started), True)
        self.finish()

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        self.buffered = None
        self.resolve = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        pool = self.pool
        proxy = self.proxy
        proxy.in_flight -= 1
        if not proxy.in_flight and proxy.idle is not None:
            proxy.idle.set()
        if pool is not None:
            pool.active -= 1
            pool.stats.observe_latency(pool.name, proxy.clock.now() - self.start)
            if pool.held:
                pool.unhold(self)
        down = self.down
        down.call = None
        down.source = None
        if not down.remote_closed and not down.pending and down.local_closed:
            down.conn.reset(down, NO_ERROR)  # answered before the request ended: stop the client sending


class Proxy:
    """Routes each downstream stream to a pool, picks an endpoint, relays, retries, accounts."""

    def __init__(
        self,
        router: Router,
        pools: dict[str, Pool],
        unary_methods: set[str],
        *,
        clock: Clock = MONOTONIC,
        rng: random.Random | None = None,
        flusher: Flusher | None = None,
        max_message_bytes: int = 64 << 20,
    ) -> None:
        self.router = router
        self.pools = pools
        self.unary_methods = {m.encode() for m in unary_methods}
        self.clock = clock
        self.rng = rng if rng is not None else random.Random()
        self.flusher = flusher if flusher is not None else Flusher()
        self.max_message_bytes = max_message_bytes
        self.draining = False
        #: set once shutdown began: connections get GOAWAY and close when idle
        self.draining_connections = False
        self.in_flight = 0
        self.connections: set[DownstreamConnection] = set()
        self.servers: list[asyncio.AbstractServer] = []
        self._heads: dict[Headers, RequestHead] = {}
        #: set when in_flight drops to 0 during shutdown
        self.idle: asyncio.Event | None = None
        for pool in pools.values():
            pool.on_ready = lambda p=pool: self.release_held(p)

    # ------------------------------------------------------------------ listening

    async def listen(self, address: str, reuse_port: bool = False) -> int:
        """Serve on ``host:port``; returns the bound port."""
        host, _, port = address.rpartition(":")
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: DownstreamConnection(self), host.strip("[]") or None, int(port),
                                          reuse_port=reuse_port or None, backlog=1024)
        self.servers.append(server)
        return server.sockets[0].getsockname()[1]

    async def shutdown(self, grace: float | None) -> None:
        """Stop accepting, GOAWAY every connection, wait up to ``grace`` for calls, then close."""
        self.draining_connections = True
        for s in self.servers:
            s.close()
        for c in list(self.connections):
            c.send_goaway()
            if not c.streams:
                c.close()
        self.flusher.run()
        if grace and self.in_flight:
            self.idle = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.idle.wait(), grace)
        for c in list(self.connections):
            c.close()
        for s in self.servers:
            await s.wait_closed()
        self.servers.clear()

    # ------------------------------------------------------------------ calls

    def new_call(self, st: Stream, headers: Headers, end: bool) -> None:
        head = self._heads.get(headers)
        if head is None:
            head = RequestHead(headers)
            if head.timeout is None and len(self._heads) < 1024:
                self._heads[headers] = head
        conn: DownstreamConnection = st.conn  # type: ignore[assignment]
        if head.error is not None:
            conn.respond_http(st, *head.error)
            return
        call = Call(self, st, head, end)
        st.call = call
        self.in_flight += 1
        call.start = self.clock.now()
        if head.timeout is not None:  # armed now: a model-routed call may wait for its first bytes
            self.arm_deadline(call, call.start + head.timeout)
        if self.draining and head.method == HEALTH_CHECK:
            self.respond_locally(call, NOT_SERVING_RESPONSE)
            return
        needs_model, resolve = self.router.resolver(head.method)
        if needs_model:
            call.resolve = resolve
            self.try_route(call)
        else:
            self.dispatch(call, resolve(None))

    def try_route(self, call: Call) -> None:
        """Model routing: dispatch once the first message's model name can be read."""
        buf = b"".join(call.buffered or ())
        resolve = call.resolve
        assert resolve is not None
        msg: bytes | None = None
        if len(buf) >= 5:
            size = int.from_bytes(buf[1:5], "big")
            msg = buf[5:5 + size]
            if len(msg) < size and len(msg) < 4096 and not call.req_done:
                return  # wait for more of the message
            if buf[0] != 0:
                msg = None  # compressed: the model name cannot be peeked
        elif not call.req_done:
            return
        call.resolve = None
        self.dispatch(call, resolve(msg))

    def dispatch(self, call: Call, pool_name: str | None) -> None:
        pool = self.pools.get(pool_name) if pool_name is not None else None
        if pool is None:
            call.fail(UNIMPLEMENTED, f"no route for {call.head.method}")
            return
        call.pool = pool
        pool.active += 1
        cb = pool.config.circuit_breakers
        if pool.active > cb.max_requests:
            pool.stats.count(pool.name, "circuit_open_requests")
            call.fail(RESOURCE_EXHAUSTED, f"pool '{pool.name}' is over its max_requests ({cb.max_requests})")
            return
        head = call.head
        buf = call.buffered
        if buf and len(buf[0]) >= 5:
            size = int.from_bytes(buf[0][1:5], "big")
            if size > self.max_message_bytes:
                call.fail(RESOURCE_EXHAUSTED, f"request message of {size} bytes is over the balancer's "
                                              f"max_message_bytes ({self.max_message_bytes})")
                return
        timeout = head.timeout
        pt = pool.config.timeout
        if pt is not None and (timeout is None or pt < timeout):
            timeout = pt
        if timeout is not None and timeout != head.timeout:  # the pool's timeout is shorter: re-arm
            self.arm_deadline(call, call.start + timeout)
        if call.deadline is not None and call.deadline <= self.clock.now():
            call.fail(DEADLINE_EXCEEDED, "deadline exceeded at the balancer")
            return
        if call.retryable:
            pool.budget.deposit()
        self.attempt(call)

    def arm_deadline(self, call: Call, deadline: float) -> None:
        """Enforce ``deadline`` (on ``clock``), counted from the request's arrival."""
        if call.timer is not None:
            call.timer.cancel()
        call.deadline = deadline
        call.timer = asyncio.get_running_loop().call_later(max(0.0, deadline - self.clock.now()), call.on_deadline)

    def attempt(self, call: Call) -> None:
        if call.finished:
            return
        pool = call.pool
        assert pool is not None
        now = self.clock.now()
        for _ in range(4):  # an endpoint can be retired between snapshot and pick
            try:
                ep = pool.picker.pick(pool.snapshot, call.exclude)
            except NoEndpoint as exc:
                if call.attempt == 0 and pool.config.activator.enabled and not pool.snapshot.entries:
                    self.hold(call, pool)
                    return
                pool.stats.count(pool.name, "no_endpoint")
                call.fail(UNAVAILABLE, str(exc))
                return
            up = ep.upstream
            if up is not None:
                break
            call.exclude = ep
        else:
            call.fail(UNAVAILABLE, f"no endpoint of pool '{pool.name}' is connectable")
            return
        call.ep = ep
        call.t0 = now
        ep.outstanding += 1
        call.attempt += 1
        if call.attempt > 1:
            call.is_retry = True
            pool.active_retries += 1
        conn = up.connection()
        if conn is None:  # connect backoff: fail this attempt now, maybe retry elsewhere
            call.attempt_failed(f"endpoint {ep.address} of pool '{pool.name}' is unreachable"
                                f" ({up.last_error or 'connect failed'})")
            return
        if not conn.connected:
            cb = pool.config.circuit_breakers
            if pool.pending >= cb.max_pending:
                pool.stats.count(pool.name, "circuit_open_pending")
                call.end_attempt(Outcome.APP_ERROR, "RESOURCE_EXHAUSTED")
                call.fail(RESOURCE_EXHAUSTED, f"pool '{pool.name}' is over its max_pending ({cb.max_pending})")
                return
            pool.pending += 1
            call.pending = True
        ust = conn.open_stream(call)
        down = call.down
        ust.source = None if call.retryable else down  # see Call.downstream_data
        down.source = ust
        call.up = ust
        head = call.head
        block = head.block if head.has_authority else encode_field((b":authority", up.address.encode())) + head.block
        if call.deadline is not None:
            block += timeout_field(call.deadline - now)
        buf = call.buffered
        if not buf:
            conn.send_headers(ust, block, call.req_done)
        else:
            conn.send_headers(ust, block, False)
            last = len(buf) - 1
            done = call.req_done
            for i, chunk in enumerate(buf):
                conn.send_data(ust, chunk, done and i == last)
        if not call.retryable:
            call.buffered = None

    # ------------------------------------------------------------------ scale from zero

    def hold(self, call: Call, pool: Pool) -> None:
        """The pool has no endpoint: keep the call until one is added (activator), bounded in count and time."""
        act = pool.config.activator
        if len(pool.held) >= act.max_requests:
            pool.stats.count(pool.name, "held_overflow")
            call.fail(RESOURCE_EXHAUSTED, f"pool '{pool.name}' has no replica yet and already holds "
                                          f"{len(pool.held)} requests (activator.max_requests)")
            return
        pool.stats.count(pool.name, "held")
        timer = asyncio.get_running_loop().call_later(act.timeout, self._held_too_long, call, pool)
        pool.hold(call, timer)

    def _held_too_long(self, call: Call, pool: Pool) -> None:
        if pool.unhold(call):
            pool.stats.count(pool.name, "held_timeout")
            call.fail(UNAVAILABLE, f"pool '{pool.name}' has no endpoint: no replica became ready within "
                                   f"{pool.config.activator.timeout:g}s")

    def release_held(self, pool: Pool) -> None:
        """An endpoint appeared: send every held call (in arrival order)."""
        for call in pool.take_held():
            self.attempt(call)

    def retry(self, call: Call) -> bool:
        """Schedule another attempt if retry policy, budget, breaker and deadline allow."""
        pool = call.pool
        if not call.retryable or pool is None or call.buffered is None:
            return False
        rcfg = pool.config.retry
        if call.attempt >= rcfg.max_attempts or len(pool.snapshot) == 0:
            return False
        stats = pool.stats
        delay = backoff(call.attempt, rcfg, self.rng)
        if call.deadline is not None and self.clock.now() + delay >= call.deadline:
            stats.count(pool.name, "retry_deadline_exceeded")
            return False
        if pool.active_retries >= pool.config.circuit_breakers.max_retries:
            stats.count(pool.name, "circuit_open_retries")
            return False
        if not pool.budget.try_withdraw():
            stats.count(pool.name, "retry_budget_exhausted")
            return False
        stats.count(pool.name, "retries")
        if delay > 0:
            asyncio.get_running_loop().call_later(delay, self.attempt, call)
        else:
            self.attempt(call)
        return True

    def respond_locally(self, call: Call, message: bytes) -> None:
        """A successful unary response from the balancer itself (health while draining)."""
        down = call.down
        conn = down.conn
        conn.send_headers(down, encode(((b":status", b"200"), (b"content-type", b"application/grpc"))), False)
        conn.send_data(down, b"\x00" + len(message).to_bytes(4, "big") + message, False)
        conn.send_headers(down, status_block(OK, "", False), True)
        call.finish()
