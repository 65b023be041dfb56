"""The data plane: a service-agnostic gRPC proxy that relays HTTP/2 streams, bytes untouched.

Each downstream stream becomes a :class:`~modelyard.balancer.call.Call`: headers are decoded (HPACK,
cached), the route is resolved from ``:path`` (and, for model-routed methods, the model name peeked
from the first DATA bytes), the pool's picker chooses an endpoint, and the stream is re-opened on
one of that endpoint's HTTP/2 connections as an :class:`~modelyard.balancer.call.Attempt`. DATA
frames are relayed as they arrive in both directions, with end-to-end flow control; response headers
and trailers are re-encoded unchanged. gRPC messages are never parsed.

Where things are: wire helpers in :mod:`~modelyard.balancer.grpcwire`, request headers in
:mod:`~modelyard.balancer.request_head`, the client-facing HTTP/2 server in
:mod:`~modelyard.balancer.downstream`, the call's state machine in :mod:`~modelyard.balancer.call`,
the retry/hedge decision (pure) in :mod:`~modelyard.balancer.retry`. This module decides: the
route, circuit breaking, the endpoint of each attempt, and whether another attempt goes out.

Why not grpc.aio on both sides (the first version): every proxied call then paid a grpc.aio server
call plus a client call, which capped one process at ~3,500 calls/s on this machine.

Retries: unary methods keep their request bytes until a response starts; a connect failure, a
refused or reset stream, a lost connection, or a trailers-only UNAVAILABLE before any response byte
is retried on another endpoint (:func:`~modelyard.balancer.retry.decide_retry`: attempts, deadline,
retry circuit breaker, budget). Hedges: an idempotent unary call whose attempt has not answered
within its endpoint's per-try timeout (learned from that endpoint's latency) gets a second attempt
elsewhere; the first answer wins. Deadlines: ``grpc-timeout`` is replaced by the time remaining (min
with the pool timeout) on every attempt, and the proxy enforces it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import time

from modelyard import tracing
from modelyard.balancer.affinity import pick_by_key, sequence_key
from modelyard.balancer.call import Attempt, Call, State
from modelyard.balancer.downstream import DownstreamConnection
from modelyard.balancer.endpoint import NoEndpoint, Outcome
from modelyard.balancer.grpcwire import (
    DEADLINE_EXCEEDED,
    HEALTH_CHECK,
    NOT_SERVING_RESPONSE,
    OK,
    RESOURCE_EXHAUSTED,
    UNAVAILABLE,
    UNIMPLEMENTED,
    status_block,
    timeout_field,
)
from modelyard.balancer.guard import admit
from modelyard.balancer.h2 import hpack
from modelyard.balancer.h2.connection import Flusher, Stream
from modelyard.balancer.h2.hpack import Headers, encode, encode_field
from modelyard.balancer.limits import DEFAULT_LIMITS, LimitsConfig
from modelyard.balancer.pool import Pool
from modelyard.balancer.request_head import HeadCache, RequestHead
from modelyard.balancer.retry import backoff, decide_retry
from modelyard.balancer.routing import Router, peek_model_name, peek_sequence_id
from modelyard.balancer.tracing import start_call
from modelyard.clock import MONOTONIC, Clock
from modelyard.security.guard import Guard, Refused

__all__ = ["DownstreamConnection", "Proxy"]


class Proxy:
    """Routes each downstream stream to a pool, picks an endpoint, relays, retries, accounts."""

    def __init__(
        self,
        router: Router,
        pools: dict[str, Pool],
        unary_methods: set[str],
        *,
        idempotent_methods: set[str] | None = None,
        clock: Clock = MONOTONIC,
        rng: random.Random | None = None,
        flusher: Flusher | None = None,
        max_message_bytes: int = 64 << 20,
        limits: LimitsConfig | None = None,
    ) -> None:
        self.router = router
        self.pools = pools
        self.unary_methods = frozenset(m.encode() for m in unary_methods)
        self.idempotent_methods = frozenset(m.encode() for m in (idempotent_methods or ()))
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
        #: limits of the client-facing HTTP/2 server (hostile clients)
        self.limits = limits if limits is not None else DEFAULT_LIMITS
        self._heads = HeadCache(self.limits.header_cache_bytes)
        hpack.set_cache_budget(self.limits.header_cache_bytes)
        #: set when in_flight drops to 0 during shutdown
        self.idle: asyncio.Event | None = None
        #: tokens, allow lists and rate limits checked before routing (balancer/guard.py); None = off
        self.guard: Guard | None = None
        #: TLS on the listeners (an SSLContext whose certificate follows its files); None = cleartext
        self.ssl: ssl.SSLContext | None = None
        for pool in pools.values():
            pool.on_ready = lambda p=pool: self.release_held(p)
        #: some pool pins sequences: ModelInfer / ModelStreamInfer wait for their first message's sequence_id
        self.pins_sequences = any(p.config.sequence_affinity for p in pools.values())

    # ------------------------------------------------------------------ listening

    async def listen(self, address: str, reuse_port: bool = False) -> int:
        """Serve on ``host:port``; returns the bound port."""
        host, _, port = address.rpartition(":")
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: DownstreamConnection(self), host.strip("[]") or None, int(port),
                                          reuse_port=reuse_port or None, backlog=1024, ssl=self.ssl)
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
            head = RequestHead(headers, self.unary_methods, self.idempotent_methods)
            if head.timeout is None and head.traceparent is None:  # both differ per call: never hit
                self._heads.put(headers, head)
        conn: DownstreamConnection = st.conn  # type: ignore[assignment]
        if head.error is not None:
            conn.respond_http(st, *head.error)
            return
        call = Call(self, st, head, end)
        st.handler = call
        self.in_flight += 1
        call.start = self.clock.now()
        if tracing.ACTIVE is not None:
            call.trace = start_call(head.method, head.traceparent, **{"rpc.system": "grpc"})
        if self.guard is not None:
            try:
                call.scan = admit(self.guard, head.rule, head.authorization, lambda: conn.peer)
            except Refused as exc:
                call.refuse(exc)
                return
        if head.timeout is not None:  # armed now: a model-routed call may wait for its first bytes
            self.arm_deadline(call, call.start + head.timeout)
        if self.draining and head.method == HEALTH_CHECK:
            self.respond_locally(call, NOT_SERVING_RESPONSE)
            return
        needs_model, resolve = self.router.resolver(head.method)
        if needs_model or (head.sequenced and self.pins_sequences):
            call.resolve = resolve
            self.try_route(call)
        else:
            self.dispatch(call, resolve(None))

    def try_route(self, call: Call) -> None:
        """Model routing and sequence affinity: dispatch once the first message's model name and
        ``sequence_id`` can be read (or the message ends, or 4 KiB of it came)."""
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
        key = None
        if msg is not None and call.head.sequenced and self.pins_sequences:
            seq = peek_sequence_id(msg)
            if seq is not None:
                key = call.sequence = sequence_key(peek_model_name(msg), seq)
        self.dispatch(call, resolve(msg, key))

    def dispatch(self, call: Call, pool_name: str | None) -> None:
        pool = self.pools.get(pool_name) if pool_name is not None else None
        if pool is None:
            call.fail(UNIMPLEMENTED, f"no route for {call.head.method}")
            return
        call.pool = pool
        if call.sequence is not None:
            if pool.config.sequence_affinity:
                pool.stats.count(pool.name, "sequence_pinned")
            else:
                call.sequence = None
        over = pool.enter()
        if over is not None:
            call.fail(RESOURCE_EXHAUSTED, over)
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

    def attempt(self, call: Call, hedge: bool = False) -> None:
        """Send one attempt of ``call`` to an endpoint the picker chooses (not one already tried, if it can)."""
        if call.state is State.DONE:
            return
        pool = call.pool
        assert pool is not None
        now = self.clock.now()
        exclude = call.tried
        trace = call.trace
        key = call.sequence
        pick_ns = time.perf_counter_ns() if trace is not None else 0
        for _ in range(4):  # an endpoint can be retired between snapshot and pick
            try:
                ep = pool.picker.pick(pool.snapshot, exclude) if key is None else pick_by_key(pool.snapshot, key)
            except NoEndpoint as exc:
                if call.tries == 0 and pool.config.activator.enabled and not pool.snapshot.entries:
                    self.hold(call, pool)
                    return
                pool.stats.count(pool.name, "no_endpoint")
                if not call.attempts:
                    call.fail(UNAVAILABLE, str(exc))
                return
            up = ep.upstream
            if up is not None and (not hedge or all(a.ep is not ep for a in call.attempts)):
                break
            exclude = [*exclude, ep]
        else:
            if not call.attempts:
                call.fail(UNAVAILABLE, f"no endpoint of pool '{pool.name}' is connectable")
            return
        if pool.snapshot.panic:
            pool.stats.count(pool.name, "panic_picks")
        if trace is not None:
            trace.picked(pick_ns, pool.name, pool.picker.name if key is None else "sequence_affinity", ep.address,
                         call.tries + 1)
        call.tries += 1
        call.state = State.ATTEMPTING
        a = Attempt(call, ep, call.tries, now)
        call.attempts.append(a)
        if ep not in call.tried:
            call.tried.append(ep)
        ep.outstanding += 1
        if a.number > 1:
            pool.active_retries += 1
        conn = up.connection()
        if conn is None:  # connect backoff: fail this attempt now, maybe retry elsewhere
            call.attempt_failed(a, f"endpoint {ep.address} of pool '{pool.name}' is unreachable"
                                   f" ({up.last_error or 'connect failed'})")
            return
        if not conn.connected:
            cb = pool.config.circuit_breakers
            if pool.pending >= cb.max_pending:
                pool.stats.count(pool.name, "circuit_open_pending")
                call.end_attempt(a, Outcome.APP_ERROR, "RESOURCE_EXHAUSTED")
                if not call.attempts:
                    call.fail(RESOURCE_EXHAUSTED, f"pool '{pool.name}' is over its max_pending ({cb.max_pending})")
                return
            pool.pending += 1
            a.pending = True
        ust = conn.open_stream(a)
        a.stream = ust
        down = call.down
        ust.source = None if call.retryable else down  # see Call.on_data
        down.source = ust
        head = call.head
        block = head.block if head.has_authority else encode_field((b":authority", up.address.encode())) + head.block
        if call.deadline is not None:
            block += timeout_field(call.deadline - now)
        tp = head.traceparent if trace is None else trace.traceparent  # as received, or our span as parent
        if tp is not None:
            block += encode_field((b"traceparent", tp))
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
        elif head.idempotent and pool.config.hedge.enabled and key is None:
            a.timer = asyncio.get_running_loop().call_later(ep.rtt.timeout(pool.config.hedge), a.per_try_timeout)

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
        call.state = State.HELD
        timer = asyncio.get_running_loop().call_later(act.timeout, self._held_too_long, call, pool)
        pool.hold(call, timer)

    def _held_too_long(self, call: Call, pool: Pool) -> None:
        if pool.unhold(call):
            pool.stats.count(pool.name, "held_timeout")
            call.fail(UNAVAILABLE, f"pool '{pool.name}' has no endpoint: no replica became ready within "
                                   f"{pool.config.activator.timeout:g}s")

    def release_held(self, pool: Pool) -> None:
        """An endpoint appeared: send every held call (in arrival order)."""
        for call in pool.take_held(Call):
            self.attempt(call)

    def retry(self, call: Call, kind: str) -> bool:
        """Another attempt of ``call`` -- a ``"retry"`` after a failure or a ``"hedge"`` beside a slow
        one -- if :func:`decide_retry` allows; counts the decision's counter either way."""
        pool = call.pool
        if pool is None or call.state is State.DONE:
            return False
        cfg = pool.config
        live = {id(a.ep) for a in call.attempts}
        candidates = sum(1 for e in pool.snapshot.endpoints if id(e) not in live) if kind == "hedge" \
            else len(pool.snapshot)
        d = decide_retry(kind, retryable=call.retryable and call.buffered is not None,
                         idempotent=call.head.idempotent, response_started=call.winner is not None,
                         attempts=call.tries, max_attempts=cfg.retry.max_attempts, candidates=candidates,
                         now=self.clock.now(), deadline=call.deadline,
                         backoff_delay=backoff(call.tries, cfg.retry, self.rng),
                         retries_in_flight=pool.active_retries, max_retries=cfg.circuit_breakers.max_retries,
                         budget_available=pool.budget.available(), pinned=call.sequence is not None)
        pool.count_retry_decision(d.counter)
        if not d.go:
            return False
        pool.budget.withdraw()
        if d.delay > 0:
            call.state = State.BACKOFF
            asyncio.get_running_loop().call_later(d.delay, self.attempt, call)
        else:
            self.attempt(call, hedge=kind == "hedge")
        return True

    def respond_locally(self, call: Call, message: bytes) -> None:
        """A successful unary response from the balancer itself (health while draining)."""
        down = call.down
        conn = down.conn
        conn.send_headers(down, encode(((b":status", b"200"), (b"content-type", b"application/grpc"))), False)
        conn.send_data(down, b"\x00" + len(message).to_bytes(4, "big") + message, False)
        conn.send_headers(down, status_block(OK, "", False), True)
        call.finish()
