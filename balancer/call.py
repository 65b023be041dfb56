"""One proxied call: an explicit state, its attempts, the request bytes kept for them, the deadline.

A call is the handler of the client's stream; each :class:`Attempt` is the handler of one upstream
stream. A call has a first attempt, maybe retries (after a failure, with backoff) and hedges (after a
per-try timeout, while the first keeps running). The first attempt to answer wins: its response is
relayed and every other attempt is cancelled.

States (:class:`State`)::

    ROUTING -> [HELD] -> ATTEMPTING <-> BACKOFF
                              |
                              v
                          RESPONDING -> DONE      (any state -> DONE: answered, failed or cancelled)

The decisions (which pool, which endpoint, whether another attempt) are the proxy's; this module
only moves bytes and keeps the books of each attempt.
"""

from __future__ import annotations

import asyncio
import enum
from typing import TYPE_CHECKING

from modelyard.balancer.endpoint import Endpoint, Outcome
from modelyard.balancer.grpcwire import (
    CODE_NAMES,
    DEADLINE_EXCEEDED,
    FAILURE_CODES,
    INTERNAL,
    OK,
    UNAVAILABLE,
    grpc_status,
    status_block,
)
from modelyard.balancer.h2.connection import CANCEL, NO_ERROR, Stream
from modelyard.balancer.h2.hpack import Headers, encode
from modelyard.balancer.request_head import RequestHead
from modelyard.balancer.routing import Resolver
from modelyard.balancer.tracing import CallTrace
from modelyard.security.guard import Refused

if TYPE_CHECKING:
    from modelyard.balancer.guard import ModelScanner
    from modelyard.balancer.pool import Pool
    from modelyard.balancer.proxy import Proxy

#: unary request bytes kept for a retry or a hedge; bigger requests are sent once
RETRY_BUFFER_BYTES = 4 << 20


class State(enum.Enum):
    ROUTING = "routing"          # waiting for the first message (model name) to choose a pool
    HELD = "held"                # the pool has no endpoint yet (activator)
    ATTEMPTING = "attempting"    # attempts in flight, nothing relayed to the client yet
    BACKOFF = "backoff"          # between a failed attempt and the next
    RESPONDING = "responding"    # one attempt's response is being relayed: the others are gone
    DONE = "done"


def outcome_of(code: int) -> Outcome:
    return Outcome.SUCCESS if code == OK else Outcome.FAILURE if code in FAILURE_CODES else Outcome.APP_ERROR


def code_name(code: int) -> str:
    return CODE_NAMES[code] if 0 <= code < len(CODE_NAMES) else "UNKNOWN"


class Attempt:
    """One try of a call on one endpoint: the handler of its upstream stream, and its accounting."""

    __slots__ = ("call", "ep", "inflight", "live", "number", "pending", "stream", "t0", "timed_out", "timer")

    def __init__(self, call: Call, ep: Endpoint, number: int, t0: float) -> None:
        self.call = call
        self.ep = ep
        self.number = number
        self.t0 = t0
        #: the endpoint's other attempts in flight when this one was sent (latency-vs-load models learn from it)
        self.inflight = ep.outstanding
        self.stream: Stream | None = None
        #: counted in the pool's ``pending`` (its connection was not up when it was sent)
        self.pending = False
        self.timer: asyncio.TimerHandle | None = None
        #: its per-try timeout passed (a hedge may be running beside it)
        self.timed_out = False
        self.live = True

    # the upstream stream's events
    def on_headers(self, headers: Headers, end: bool) -> None:
        self.call.attempt_headers(self, headers, end)

    def on_data(self, data: bytes, end: bool) -> None:
        self.call.attempt_data(self, data, end)

    def on_failed(self, reason: str) -> None:
        self.call.attempt_failed(self, reason)

    def per_try_timeout(self) -> None:
        self.timer = None
        self.timed_out = True
        self.call.attempt_timed_out(self)


class Call:
    """One proxied call: the handler of the client's stream."""

    __slots__ = ("attempts", "buffered", "buffered_bytes", "deadline", "down", "head", "pool", "proxy", "req_done",
                 "resolve", "retry_held", "retryable", "scan", "sequence", "start", "state", "timer", "trace", "tried",
                 "tries", "winner")

    def __init__(self, proxy: Proxy, down: Stream, head: RequestHead, req_done: bool) -> None:
        self.proxy = proxy
        self.down = down
        self.head = head
        self.state = State.ROUTING
        self.pool: Pool | None = None
        #: attempts in flight, and every endpoint tried so far (retries and hedges go elsewhere)
        self.attempts: list[Attempt] = []
        self.tried: list[Endpoint] = []
        self.tries = 0
        self.winner: Attempt | None = None
        #: request bytes not yet sent upstream, or kept for another attempt
        self.buffered: list[bytes] | None = []
        self.buffered_bytes = 0
        #: bytes credited to the client as they were kept for a retry, counted in its connection's budget
        #: (limits.connection_buffer_bytes) until the call ends: they may still wait for the upstream's window
        self.retry_held = 0
        self.req_done = req_done
        #: a unary method: its request bytes are kept until a response starts, so it can be sent again
        self.retryable = head.unary
        self.resolve: Resolver | None = None
        #: the sequence-affinity key (model, ``sequence_id``) of its first message: the call is pinned to
        #: the endpoint that owns the key, never retried elsewhere nor hedged (balancer/affinity.py)
        self.sequence: bytes | None = None
        self.deadline: float | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.start = 0.0
        #: the call's spans (tracing on only)
        self.trace: CallTrace | None = None
        #: checks the model of each request message before it is sent on (a caller limited to some models)
        self.scan: ModelScanner | None = None

    @property
    def finished(self) -> bool:
        return self.state is State.DONE

    # ------------------------------------------------------------------ the client's stream

    def on_headers(self, headers: Headers, end: bool) -> None:
        """Request trailers: gRPC has none; the end of the request."""
        if end:
            self.on_data(b"", True)

    def on_data(self, data: bytes, end: bool) -> None:
        """Request bytes from the client.

        Window credit: a retryable call keeps its bytes, so the client is credited when they are
        buffered and attempts send them without crediting again (a replay must not credit twice);
        any other call is credited when its bytes are written upstream (end-to-end back-pressure).
        """
        if end:
            self.req_done = True
        if self.state is State.DONE:
            return
        if self.scan is not None:
            try:
                self.scan.feed(data)
            except Refused as exc:
                self.refuse(exc)
                return
        for a in self.attempts:
            st = a.stream
            if st is not None:
                st.conn.send_data(st, data, end)
        buf = self.buffered
        if buf is None:
            return
        if not self.retryable and self.attempts:
            return  # sent, and credited as it is written
        buf.append(data)
        self.buffered_bytes += len(data)
        if self.retryable:
            down = self.down
            n = len(data)
            conn = down.conn
            conn.consumed(down, n)
            if self.buffered_bytes <= RETRY_BUFFER_BYTES and conn.retry_held + n <= conn.conn_window:
                conn.retry_held += n  # the connection's retry budget
                self.retry_held += n
            else:  # too big to keep (for the call, or its connection's budget): sent once, credited on send
                self.retryable = False
                if self.attempts:
                    self.buffered = None
                    for a in self.attempts:
                        if a.stream is not None:
                            a.stream.source = down
        if self.resolve is not None:
            self.proxy.try_route(self)

    def on_failed(self, reason: str) -> None:
        """The client went away or reset its stream: cancel every attempt."""
        if self.state is State.DONE:
            return
        for a in list(self.attempts):
            self.end_attempt(a, Outcome.APP_ERROR, "CANCELLED")
        self.finish()

    # ------------------------------------------------------------------ an attempt's stream

    def attempt_headers(self, a: Attempt, headers: Headers, end: bool) -> None:
        if not a.live or self.state is State.DONE:
            return
        down = self.down
        if not end:  # response headers: this attempt wins
            self.commit(a)
            down.conn.send_headers(down, encode(headers), False)
            return
        code = grpc_status(headers)
        if code == UNAVAILABLE and self.winner is None:
            self.end_attempt(a, Outcome.FAILURE, "UNAVAILABLE")
            if self.attempts or self.proxy.retry(self, "retry"):
                return  # another attempt is running, or one was scheduled
        else:
            if self.winner is None:
                self.commit(a)  # a trailers-only answer is an answer
            self.end_attempt(a, outcome_of(code), code_name(code))
        down.conn.send_headers(down, encode(headers), True)
        self.finish()

    def attempt_data(self, a: Attempt, data: bytes, end: bool) -> None:
        if a is not self.winner or self.state is State.DONE:
            return
        down = self.down
        down.conn.send_data(down, data, False)
        if end:  # a gRPC response always ends with trailers
            self.end_attempt(a, Outcome.FAILURE, "INTERNAL")
            self.fail(INTERNAL, f"upstream {a.ep.address} ended the response without trailers")

    def attempt_failed(self, a: Attempt, reason: str) -> None:
        """Connect failure, lost connection, RST_STREAM or GOAWAY for this attempt."""
        if not a.live or self.state is State.DONE:
            return
        a.stream = None  # the stream is gone: nothing to reset
        self.end_attempt(a, Outcome.FAILURE, "UNAVAILABLE")
        if self.winner is None and (self.attempts or self.proxy.retry(self, "retry")):
            return
        self.fail(UNAVAILABLE, reason)

    def attempt_timed_out(self, a: Attempt) -> None:
        """``a`` passed its endpoint's per-try timeout: hedge (it keeps running)."""
        if a.live and self.state is State.ATTEMPTING:
            pool = self.pool
            if pool is not None:
                pool.stats.count(pool.name, "per_try_timeouts")
            self.proxy.retry(self, "hedge")

    def on_deadline(self) -> None:
        self.timer = None
        if self.state is State.DONE:
            return
        for a in list(self.attempts):
            # an attempt that also outlived its per-try timeout says something about its endpoint
            self.end_attempt(a, Outcome.FAILURE if a.timed_out else Outcome.APP_ERROR, "DEADLINE_EXCEEDED")
        self.fail(DEADLINE_EXCEEDED, "deadline exceeded at the balancer")

    # ------------------------------------------------------------------ books

    def commit(self, a: Attempt) -> None:
        """``a`` answers: no other attempt, no retry from here on; later request bytes are credited as sent."""
        self.winner = a
        self.state = State.RESPONDING
        for other in list(self.attempts):
            if other is not a:
                # a hedge that lost to a faster one: its endpoint was slow only if its per-try timeout passed
                self.end_attempt(other, Outcome.FAILURE if other.timed_out else Outcome.APP_ERROR,
                                 "PER_TRY_TIMEOUT" if other.timed_out else "HEDGE_CANCELLED")
        self.buffered = None
        if a.timer is not None:
            a.timer.cancel()
            a.timer = None
        if a.stream is not None:
            a.stream.source = self.down

    def end_attempt(self, a: Attempt, outcome: Outcome, code: str) -> None:
        """Close ``a``'s books: its stream (reset if still open), the endpoint's counters, the pool's record."""
        if not a.live:
            return
        a.live = False
        if a.timer is not None:
            a.timer.cancel()
            a.timer = None
        st = a.stream
        if st is not None:
            st.handler = None
            if not (st.local_closed and st.remote_closed):
                st.conn.reset(st, CANCEL)  # the attempt is over: the upstream must not wait for more
        try:
            self.attempts.remove(a)
        except ValueError:
            pass
        pool = self.pool
        if pool is None:
            return
        a.ep.outstanding -= 1
        if a.pending:
            pool.pending -= 1
            a.pending = False
        if a.number > 1:
            pool.active_retries -= 1
        pool.record(a.ep, outcome, self.proxy.clock.now() - a.t0, code, a.inflight)

    def fail(self, code: int, message: str, extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        """End the call with ``code`` (trailers-only unless response headers went out), every attempt
        cancelled; ``extra`` trailers go with it (``retry-after-ms``)."""
        if self.state is State.DONE:
            return
        if self.trace is not None:
            self.trace.error(f"{code_name(code)}: {message}")
        for a in list(self.attempts):
            self.end_attempt(a, Outcome.APP_ERROR, "CANCELLED")
        down = self.down
        down.conn.send_headers(down, status_block(code, message, self.winner is None, extra), True)
        self.finish()

    def refuse(self, exc: Refused) -> None:
        """End the call with the guard's refusal (UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED)."""
        hint = exc.retry_after_ms
        self.fail(exc.grpc_code, exc.message, () if hint is None else ((b"retry-after-ms", str(hint).encode()),))

    def finish(self) -> None:
        if self.state is State.DONE:
            return
        self.state = State.DONE
        self.buffered = None
        held = self.retry_held
        if held:  # what it counted in its connection's retry budget comes back
            self.down.conn.retry_held -= held
            self.retry_held = 0
        self.resolve = None
        # no cycle outlives the call (Call <-> winning Attempt): refcounting frees it, and the request
        # it holds, at once instead of at the next full garbage collection
        self.winner = None
        if self.trace is not None:
            self.trace.end(**{"modelyard.pool": self.pool.name if self.pool else None, "modelyard.tries": self.tries})
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for a in list(self.attempts):  # cannot be, but never leak an attempt's counters
            self.end_attempt(a, Outcome.APP_ERROR, "CANCELLED")
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
        down.handler = None
        down.source = None
        if not down.remote_closed and not down.pending and down.local_closed:
            down.conn.reset(down, NO_ERROR)  # answered before the request ended: stop the client sending
