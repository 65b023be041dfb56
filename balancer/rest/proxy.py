"""The REST data plane: an HTTP/1.1 relay that routes by model to the replicas' HTTP ports.

Each client connection is an asyncio protocol with an httptools (llhttp) request parser. A request is
read whole (head and body, bounded), then routed: the model comes from the path
(``/v2/models/{model}[/versions/{v}]/...``, ``/v2/repository/models/{model}/...``) or, on the
OpenAI-style paths, from the JSON body's ``model`` field; the balancer's routes (their ``model`` globs;
routes that match on a gRPC service or method are left out) choose the pool. The pool is the gRPC side's:
the same snapshot of endpoints -- those with an ``http`` address -- the same picker (``pool.picker.pick``),
the same accounting (``pool.record``: the picker's feedback, outlier ejection, counters), health, drain,
circuit breakers, retry budget and activator. The response is relayed as it arrives: Content-Length
bodies byte for byte, chunked bodies and server-sent events chunk by chunk (never buffered whole), with
back-pressure (a client that does not read pauses the upstream connection).

Retries: a request that was never sent (connect failure, endpoint in connect backoff) is retried on
another endpoint whatever its method; once sent, only an idempotent one (GET, HEAD, OPTIONS, PUT, DELETE,
and the POST paths of ``rest.idempotent_paths``) is retried after a lost connection or a 503, and never
once response bytes reached the client (:func:`~modelyard.balancer.retry.decide_retry`).

Errors made here -- malformed HTTP/1.1 (400), oversized heads (431) or bodies (413), slow clients (408),
no route (404), no endpoint (503), an endpoint that failed (502) or timed out (504) -- are JSON
``{"error": ...}`` (OpenAI's shape on ``/v1/``); a malformed request closes its connection, never the
listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import random
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import cast

import httptools

from modelyard import tracing
from modelyard.balancer.affinity import pick_by_key, sequence_key
from modelyard.balancer.endpoint import Endpoint, NoEndpoint, Outcome
from modelyard.balancer.pool import Pool
from modelyard.balancer.rest.config import RestConfig
from modelyard.balancer.rest.upstream import HttpConnection, HttpUpstream
from modelyard.balancer.rest.wire import (
    HOP_HEADERS,
    IDEMPOTENT_METHODS,
    SEQUENCE_MARKER,
    BadBody,
    code_name,
    error_response,
    json_length,
    mentions,
    model_from_body,
    model_from_path,
    outcome_of,
    sequence_from_json,
    status_line,
)
from modelyard.balancer.retry import RetryDecision, backoff, decide_retry
from modelyard.balancer.routing import Router
from modelyard.balancer.tracing import CallTrace, start_call
from modelyard.clock import MONOTONIC, Clock
from modelyard.security.guard import Caller, Guard, Refused, peer_address
from modelyard.security.rules import rest_rule_for

log = logging.getLogger("modelyard.balancer.rest")

#: bodies over this are parsed for their model name in a worker thread
INLINE_JSON_BYTES = 256 * 1024
#: complete requests a client may pipeline ahead of the one being answered before reading pauses
MAX_PIPELINED = 16
#: a client write buffer over this pauses the upstream connection feeding it
WRITE_HIGH_WATER = 1 << 20

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
OPENAI_PREFIX = b"/v1/"

#: call states
ROUTING, HELD, ATTEMPTING, RESPONDING, DONE = range(5)


class ClientError(Exception):
    """A request the relay answers itself with ``status`` (and closes the connection when ``close``)."""

    def __init__(self, status: int, message: str, close: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close


class RestCall:
    """One request: read whole from the client, sent to one endpoint at a time, its response relayed."""

    __slots__ = (
        "body",
        "body_len",
        "caller",
        "close_after",
        "conn",
        "deadline",
        "ep",
        "error",
        "expect_continue",
        "forward",
        "has_host",
        "headers",
        "idempotent",
        "inflight",
        "method",
        "model",
        "openai",
        "path",
        "pending",
        "pool",
        "proxy",
        "rechunk",
        "retry_after",
        "sequence",
        "started",
        "state",
        "status",
        "t0",
        "target",
        "timer",
        "trace",
        "traceparent",
        "tried",
        "tries",
        "up",
        "version",
    )

    def __init__(self, proxy: RestProxy, conn: RestConnection) -> None:
        self.proxy = proxy
        self.conn = conn
        self.method = b""
        self.target = b""
        self.path = b""
        self.version = b"1.1"
        #: request headers as received, without hop-by-hop ones (and without traceparent)
        self.headers: list[tuple[bytes, bytes]] = []
        #: the client sent Host (an HTTP/1.0 client may not; the endpoint's address is sent then)
        self.has_host = False
        self.body: list[bytes] = []
        self.body_len = 0
        self.expect_continue = False
        self.traceparent: bytes | None = None
        self.close_after = False
        self.model: str | None = None
        self.openai = False
        self.idempotent = False
        self.pool: Pool | None = None
        self.state = ROUTING
        self.tries = 0
        self.tried: list[Endpoint] = []
        #: the current attempt: endpoint, connection, start, other requests in flight to it, pending connect
        self.ep: Endpoint | None = None
        self.up: HttpConnection | None = None
        self.t0 = 0.0
        self.inflight = 0
        self.pending = False
        self.status = 0
        #: response framing towards the client: re-chunk the upstream's body pieces
        self.rechunk = False
        #: the request head (and body) as sent upstream, built once for every attempt
        self.forward: list[bytes] | None = None
        self.deadline: float | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.started = 0.0
        #: answered by the relay itself (a malformed or refused request): (status, message)
        self.error: tuple[int, str] | None = None
        #: the call's spans (tracing on only)
        self.trace: CallTrace | None = None
        #: who is calling (the balancer's auth); its models are checked once the model is known
        self.caller: Caller | None = None
        #: Retry-After seconds of a rate-limited answer
        self.retry_after: int | None = None
        #: the sequence-affinity key (model, ``sequence_id``): pinned to the endpoint that owns it, never
        #: retried elsewhere (balancer/affinity.py)
        self.sequence: bytes | None = None

    # ------------------------------------------------------------------ routing

    def start(self) -> None:
        """Route and send (the connection's turn came to this request)."""
        proxy = self.proxy
        proxy.in_flight += 1
        self.started = proxy.clock.now()
        if tracing.ACTIVE is not None:
            self.trace = start_call(f"{self.method.decode('latin-1')} {self.path.decode('latin-1')}",
                                    self.traceparent, **{"http.request.method": self.method.decode("latin-1")})
        if self.error is not None:
            self.reply_error(*self.error)
            return
        if proxy.guard is not None and not self.admit(proxy.guard):
            return
        self.idempotent = self.method in IDEMPOTENT_METHODS or (
            self.method == b"POST" and proxy.is_idempotent_path(self.path))
        if self.method == b"POST" and proxy.reads_model_from_body(self.path):
            if self.body_len > INLINE_JSON_BYTES:
                task = asyncio.get_running_loop().run_in_executor(None, model_from_body, b"".join(self.body))
                task.add_done_callback(self._model_parsed)
                return
            try:
                self.model = model_from_body(b"".join(self.body) if len(self.body) != 1 else self.body[0])
            except BadBody as exc:
                self.reply_error(400, str(exc))
                return
        else:
            self.model = model_from_path(self.path)
            if self.body_len and proxy.pins_sequences and self.method == b"POST" and self.path.endswith(b"/infer") \
                    and self.path.startswith(b"/v2/models/") and not self.find_sequence():
                return  # parsed in a worker thread: routed when done
        self.route()

    def find_sequence(self) -> bool:
        """Sequence affinity: the ``parameters.sequence_id`` of an inference request, from the body's JSON
        (its JSON part, with Triton's binary data extension), which is parsed only when it mentions
        ``"sequence_id"``. False when a big JSON went to a worker thread (:meth:`_sequence_parsed` routes)."""
        limit = json_length(self.headers)
        if not mentions(self.body, SEQUENCE_MARKER, limit):
            return True
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        doc = body if limit is None else body[:limit]
        if len(doc) > INLINE_JSON_BYTES:
            task = asyncio.get_running_loop().run_in_executor(None, sequence_from_json, doc)
            task.add_done_callback(self._sequence_parsed)
            return False
        self.pin(sequence_from_json(doc))
        return True

    def _sequence_parsed(self, fut: asyncio.Future[int | str | None]) -> None:
        if self.state == DONE:
            return
        self.pin(None if fut.exception() is not None else fut.result())
        self.route()

    def pin(self, sequence_id: int | str | None) -> None:
        if sequence_id is not None:
            self.sequence = sequence_key(self.model, sequence_id)

    def _model_parsed(self, fut: asyncio.Future[str]) -> None:
        if self.state == DONE:
            return
        exc = fut.exception()
        if exc is not None:
            self.reply_error(400, str(exc) if isinstance(exc, BadBody) else f"request body: {exc}")
            return
        self.model = fut.result()
        self.route()

    def admit(self, guard: Guard) -> bool:
        """Token, admin operation and rate limit (balancer/guard.py); False when refused (and answered)."""
        rule, model = rest_rule_for(self.path.decode("latin-1"))
        authorization = next((v.decode("latin-1") for n, v in self.headers if n.lower() == b"authorization"), None)
        try:
            caller = self.caller = guard.admit(authorization, lambda: self.conn.peer, rule.kind)
            if caller is not None:
                if rule.operation:
                    caller.check_admin(rule.operation)
                if model:
                    caller.check_model(model)
        except Refused as exc:
            if exc.retry_after_ms is not None:
                self.retry_after = max(1, -(-exc.retry_after_ms // 1000))
            self.reply_error(exc.http, exc.message)
            return False
        return True

    def route(self) -> None:
        proxy = self.proxy
        if self.caller is not None and self.model:
            try:
                self.caller.check_model(self.model)
            except Refused as exc:
                self.reply_error(exc.http, exc.message)
                return
        name = proxy.router.rest_pool(self.model, self.sequence)
        pool = proxy.pools.get(name) if name is not None else None
        if pool is None:
            what = f"model '{self.model}'" if self.model is not None else self.path.decode("latin-1")
            self.reply_error(404, f"no route for {what} in the balancer")
            return
        self.pool = pool
        if self.sequence is not None:
            if pool.config.sequence_affinity:
                pool.stats.count(pool.name, "sequence_pinned")
            else:
                self.sequence = None
        over = pool.enter()
        if over is not None:
            self.reply_error(503, over)
            return
        now = proxy.clock.now()
        if pool.config.timeout is not None:
            self.deadline = now + pool.config.timeout
            self.timer = asyncio.get_running_loop().call_later(pool.config.timeout, self.on_deadline)
        pool.budget.deposit()
        self.attempt()

    # ------------------------------------------------------------------ attempts

    def attempt(self) -> None:
        """Send to an endpoint the picker chooses (not one already tried, if it can)."""
        if self.state == DONE:
            return
        pool = self.pool
        assert pool is not None
        proxy = self.proxy
        exclude = self.tried
        trace = self.trace
        key = self.sequence
        pick_ns = time.perf_counter_ns() if trace is not None else 0
        for _ in range(4):  # an endpoint can be retired between snapshot and pick
            try:
                ep = pool.picker.pick(pool.http_snapshot, exclude) if key is None \
                    else pick_by_key(pool.http_snapshot, key)
            except NoEndpoint:
                if self.tries == 0 and pool.config.activator.enabled and not pool.snapshot.entries:
                    proxy.hold(self, pool)
                    return
                pool.stats.count(pool.name, "no_endpoint")
                if pool.snapshot.entries:
                    self.reply_error(503, f"no endpoint of pool '{pool.name}' has an HTTP address "
                                          "(endpoints need `http`: see docs/balancer.md)")
                else:
                    self.reply_error(503, f"no healthy endpoint in pool '{pool.name}'")
                return
            up = ep.http_upstream
            if up is not None:
                break
            exclude = [*exclude, ep]
        else:
            self.reply_error(503, f"no endpoint of pool '{pool.name}' is connectable")
            return
        if pool.http_snapshot.panic:
            pool.stats.count(pool.name, "panic_picks")
        if trace is not None:
            trace.picked(pick_ns, pool.name, pool.picker.name if key is None else "sequence_affinity",
                         ep.http or ep.address, self.tries + 1)
        now = proxy.clock.now()
        self.tries += 1
        self.state = ATTEMPTING
        self.ep = ep
        self.t0 = now
        self.inflight = ep.outstanding
        ep.outstanding += 1
        if ep not in self.tried:
            self.tried.append(ep)
        if self.tries > 1:
            pool.active_retries += 1
        conn = up.acquire()
        if conn is None:  # connect backoff: not sent, retry elsewhere at once
            self.attempt_failed(f"endpoint {ep.http} of pool '{pool.name}' is unreachable "
                                f"({up.last_error or 'connect failed'})", sent=False)
            return
        if not conn.connected:
            cb = pool.config.circuit_breakers
            if pool.pending >= cb.max_pending:
                pool.stats.count(pool.name, "circuit_open_pending")
                up.release(conn)
                self.end_attempt(Outcome.APP_ERROR, "RESOURCE_EXHAUSTED")
                self.reply_error(503, f"pool '{pool.name}' is over its max_pending ({cb.max_pending})")
                return
            pool.pending += 1
            self.pending = True
        self.up = conn
        forward = self.forward
        if forward is None:
            forward = self.forward = proxy.build_forward(self, ep)
        conn.send(self, forward, self.method == b"HEAD")

    def end_attempt(self, outcome: Outcome, code: str) -> None:
        """Close the current attempt's books: the endpoint's counters and the pool's record."""
        ep = self.ep
        if ep is None:
            return
        self.ep = None
        pool = self.pool
        assert pool is not None
        ep.outstanding -= 1
        if self.pending:
            pool.pending -= 1
            self.pending = False
        if self.tries > 1:
            pool.active_retries -= 1
        pool.record(ep, outcome, self.proxy.clock.now() - self.t0, code, self.inflight)

    def attempt_failed(self, reason: str, sent: bool) -> None:
        """The attempt ended without a response reaching the client: retry if allowed, else 502."""
        self.up = None
        self.end_attempt(Outcome.FAILURE, "UNAVAILABLE")
        if self.retry(sent):
            return
        log.debug("%s %s: %s", self.method.decode("latin-1"), self.path.decode("latin-1"), reason)
        self.reply_error(502, reason)

    def retry(self, sent: bool) -> bool:
        """Another attempt (after backoff) if :func:`decide_retry` allows; counts the decision either way."""
        d = self.decide(sent)
        if d is None or not d.go:
            return False
        self.go(d)
        return True

    def decide(self, sent: bool) -> RetryDecision | None:
        """Whether another attempt may go out; the decision's counter is counted."""
        pool = self.pool
        if pool is None or self.state == DONE:
            return None
        cfg = pool.config
        proxy = self.proxy
        d = decide_retry("retry", retryable=self.idempotent or not sent, idempotent=self.idempotent,
                         response_started=self.state == RESPONDING, attempts=self.tries,
                         max_attempts=cfg.retry.max_attempts, candidates=len(pool.http_snapshot),
                         now=proxy.clock.now(), deadline=self.deadline,
                         backoff_delay=backoff(self.tries, cfg.retry, proxy.rng),
                         retries_in_flight=pool.active_retries, max_retries=cfg.circuit_breakers.max_retries,
                         budget_available=pool.budget.available(), pinned=self.sequence is not None)
        pool.count_retry_decision(d.counter)
        return d

    def go(self, d: RetryDecision) -> None:
        assert self.pool is not None
        self.pool.budget.withdraw()
        self.state = ATTEMPTING
        if d.delay > 0:
            asyncio.get_running_loop().call_later(d.delay, self.attempt)
        else:
            self.attempt()

    # ------------------------------------------------------------------ the upstream's response

    def carries(self, conn: HttpConnection) -> bool:
        """``conn`` carries this call's current attempt (events of an abandoned one are ignored)."""
        return conn is self.up

    def upstream_head(self, conn: HttpConnection, status: int, headers: list[tuple[bytes, bytes]],
                      chunked: bool, has_length: bool) -> None:
        if not self.carries(conn) or self.state == DONE:
            return
        if status == 503 and self.idempotent:
            # the endpoint cannot serve now (not ready, shutting down): another may -- else its 503 is relayed
            d = self.decide(sent=True)
            if d is not None and d.go:
                self.up = None
                conn.detach()
                self.end_attempt(Outcome.FAILURE, "UNAVAILABLE")
                self.go(d)
                return
        self.state = RESPONDING
        self.status = status
        conn_client = self.conn
        head_request = self.method == b"HEAD"
        out = [status_line(status)]
        for name, value in headers:
            lname = name.lower()
            if lname in HOP_HEADERS and lname != b"content-length":
                continue
            out.append(name + b": " + value + b"\r\n")
        no_body = head_request or status in (204, 304)
        if not (no_body or has_length):
            if self.version == b"1.1":
                self.rechunk = True
                out.append(b"transfer-encoding: chunked\r\n")
            else:
                self.close_after = True  # HTTP/1.0: the body ends with the connection
        if self.close_after or conn_client.closing:
            self.close_after = True
            out.append(b"connection: close\r\n")
        elif self.version == b"1.0":
            out.append(b"connection: keep-alive\r\n")
        out.append(b"\r\n")
        conn_client.queue(b"".join(out))

    def upstream_body(self, conn: HttpConnection, data: bytes) -> None:
        if not self.carries(conn) or self.state != RESPONDING:
            return
        if self.rechunk:
            if data:
                self.conn.queue(b"%x\r\n" % len(data))
                self.conn.queue(data)
                self.conn.queue(b"\r\n")
        else:
            self.conn.queue(data)

    def upstream_done(self, conn: HttpConnection, keep_alive: bool) -> None:
        if not self.carries(conn):
            return
        self.up = None
        if keep_alive:
            conn.release()
        else:
            conn.close()
        if self.state != RESPONDING:
            return
        if self.rechunk:
            self.conn.queue(b"0\r\n\r\n")
        self.end_attempt(outcome_of(self.status), code_name(self.status))
        self.finish()

    def upstream_failed(self, conn: HttpConnection, reason: str) -> None:
        if not self.carries(conn) or self.state == DONE:
            return
        if self.state == RESPONDING:  # part of the response went out: the client sees it cut
            self.up = None
            self.end_attempt(Outcome.FAILURE, "UNAVAILABLE")
            self.close_after = True
            self.finish()
            return
        self.attempt_failed(reason, conn.sent)

    def flush(self) -> None:
        self.conn.flush()

    # ------------------------------------------------------------------ the client

    def pause_upstream(self, paused: bool) -> None:
        up = self.up
        if up is not None:
            up.pause_reading() if paused else up.resume_reading()

    def on_deadline(self) -> None:
        self.timer = None
        if self.state == DONE:
            return
        up, self.up = self.up, None
        if up is not None:
            up.detach()
        self.end_attempt(Outcome.APP_ERROR, "DEADLINE_EXCEEDED")
        pool = self.pool
        if self.state == RESPONDING:
            self.close_after = True
            self.finish()
            return
        timeout = pool.config.timeout if pool is not None else None
        self.reply_error(504, f"no response within the pool's timeout ({timeout:g} s)" if timeout else "timeout")

    def cancel(self) -> None:
        """The client went away: drop the attempt (its connection cannot be reused mid-response)."""
        if self.state == DONE:
            return
        up, self.up = self.up, None
        if up is not None:
            up.detach()
        self.end_attempt(Outcome.APP_ERROR, "CANCELLED")
        self.finish()

    def reply_error(self, status: int, message: str) -> None:
        """Answer the client ourselves (nothing was relayed yet)."""
        if self.state == DONE:
            return
        self.status = status
        if self.trace is not None:
            self.trace.error(f"HTTP {status}: {message}")
        self.conn.queue(error_response(status, message, openai=self.openai, close=self.close_after,
                                       retry_after=self.retry_after))
        self.finish()

    def finish(self) -> None:
        if self.state == DONE:
            return
        held = self.state == HELD
        self.state = DONE
        if self.trace is not None:
            self.trace.end(**{"http.response.status_code": self.status or None,
                              "modelyard.pool": self.pool.name if self.pool else None, "modelyard.tries": self.tries})
        self.body = []
        self.forward = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.ep is not None:  # cannot be, but never leak an attempt's counters
            self.end_attempt(Outcome.APP_ERROR, "CANCELLED")
        proxy = self.proxy
        proxy.in_flight -= 1
        if not proxy.in_flight and proxy.idle is not None:
            proxy.idle.set()
        pool = self.pool
        if pool is not None:
            pool.active -= 1
            pool.stats.observe_latency(pool.name, proxy.clock.now() - self.started)
            if held:
                pool.unhold(self)
        self.conn.call_done(self)


class RestConnection(asyncio.Protocol):
    """One client connection: parses requests, answers them in order (pipelining allowed, bounded)."""

    def __init__(self, proxy: RestProxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        #: the request being parsed, and complete ones waiting for their turn
        self.reading: RestCall | None = None
        self.waiting: deque[RestCall] = deque()
        self.active: RestCall | None = None
        self.head_bytes = 0
        self.header_count = 0
        self.message_started = 0.0
        self.last_progress = 0.0
        #: after this response, close (the client asked, a parse error, or draining)
        self.closing = False
        #: a parse error or limit stopped reading; the connection closes once answered
        self.broken = False
        self.paused_reading = False
        self.write_paused = False
        self._out: list[bytes] = []
        #: names listed in the request's Connection header (hop-by-hop too)
        self._conn_tokens: list[bytes] = []

    # ------------------------------------------------------------------ transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        #: the client's address, host:port (the rate limiter's key, its host, for a caller without a token)
        self.peer = peer_address(transport.get_extra_info("peername"))
        self.proxy.connections.add(self)
        self.last_progress = self.proxy.loop_time()
        if self.proxy.draining_connections:
            self.closing = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.proxy.connections.discard(self)
        self.transport = None
        self.broken = True
        self.waiting.clear()
        self.reading = None
        active, self.active = self.active, None
        if active is not None:
            active.cancel()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.active is not None:
            self.active.pause_upstream(True)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.active is not None:
            self.active.pause_upstream(False)

    def data_received(self, data: bytes) -> None:
        if self.broken:
            return
        self.last_progress = self.proxy.loop_time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # an Upgrade (h2c, websocket) this relay does not do: served as plain HTTP/1.1 (RFC 9110 7.8
            # lets a server ignore it); what follows is parsed by a fresh parser
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            self.parser = httptools.HttpRequestParser(self)
            if offset < len(data):
                self.data_received(data[offset:])
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, ClientError):
                self.fail(cause.status, cause.message)
            else:
                log.exception("REST request handling failed")
                self.fail(500, f"balancer error: {cause or exc}")
        except httptools.HttpParserError as exc:
            self.fail(400, f"malformed HTTP/1.1 request: {exc}")
        self.flush()

    def eof_received(self) -> bool | None:
        # half-close: answer what was received, then close
        self.closing = True
        if self.active is None and not self.waiting:
            return None
        return True

    # ------------------------------------------------------------------ httptools callbacks

    def on_message_begin(self) -> None:
        call = RestCall(self.proxy, self)
        self.reading = call
        self.head_bytes = 0
        self.header_count = 0
        self._conn_tokens = []
        self.message_started = self.last_progress

    def on_url(self, url: bytes) -> None:
        call = self.reading
        assert call is not None
        self.head_bytes += len(url)
        if self.head_bytes > self.proxy.cfg.max_header_bytes:
            raise ClientError(414 if not call.headers else 431, "request head larger than the "
                              f"{self.proxy.cfg.max_header_bytes} bytes allowed (rest.max_header_bytes)")
        call.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        call = self.reading
        assert call is not None
        cfg = self.proxy.cfg
        self.head_bytes += len(name) + len(value) + 4
        self.header_count += 1
        if self.head_bytes > cfg.max_header_bytes:
            raise ClientError(431, f"request head larger than the {cfg.max_header_bytes} bytes allowed "
                                   "(rest.max_header_bytes)")
        if self.header_count > cfg.max_headers:
            raise ClientError(431, f"more than {cfg.max_headers} header fields (rest.max_headers)")
        lname = name.lower()
        if lname in HOP_HEADERS:
            if lname == b"expect":
                if value.lower() != b"100-continue":
                    raise ClientError(417, f"Expect: {value.decode('latin-1')!r} is not supported")
                call.expect_continue = True
            elif lname == b"connection":
                self._conn_tokens += [t.strip().lower() for t in value.split(b",")]
            elif lname == b"content-length" and value.isdigit() and int(value) > cfg.max_body_bytes:
                raise ClientError(413, f"request body of {int(value)} bytes is larger than the "
                                       f"{cfg.max_body_bytes} bytes allowed (rest.max_body_bytes)")
            return
        if lname == b"traceparent":
            call.traceparent = value
            return
        if lname == b"host":
            call.has_host = True
        call.headers.append((name, value))

    def on_headers_complete(self) -> None:
        call = self.reading
        assert call is not None
        parser = self.parser
        call.method = parser.get_method()
        call.version = parser.get_http_version().encode()
        target = call.target
        q = target.find(b"?")
        call.path = target if q < 0 else target[:q]
        call.openai = call.path.startswith(OPENAI_PREFIX)
        if self._conn_tokens:
            drop = set(self._conn_tokens) - {b"close", b"keep-alive"}
            if drop:
                call.headers = [(n, v) for n, v in call.headers if n.lower() not in drop]
        if call.method == b"CONNECT":
            raise ClientError(405, "CONNECT is not supported")
        if not call.target.startswith(b"/"):
            raise ClientError(400, "the request target must be a path (origin-form)")
        if call.expect_continue and self.active is None and not self.waiting and self.transport is not None:
            self.transport.write(CONTINUE)

    def on_body(self, data: bytes) -> None:
        call = self.reading
        assert call is not None
        call.body_len += len(data)
        if call.body_len > self.proxy.cfg.max_body_bytes:
            raise ClientError(413, f"request body larger than the {self.proxy.cfg.max_body_bytes} bytes "
                                   "allowed (rest.max_body_bytes)")
        call.body.append(data)

    def on_message_complete(self) -> None:
        call, self.reading = self.reading, None
        assert call is not None
        if not self.parser.should_keep_alive():
            call.close_after = True
            self.closing = True
            self.broken = True  # nothing after this request is read
        if self.active is None:
            self.active = call
            call.start()
        else:
            self.waiting.append(call)
            if len(self.waiting) >= MAX_PIPELINED and self.transport is not None and not self.paused_reading:
                self.paused_reading = True
                self.transport.pause_reading()

    # ------------------------------------------------------------------ answers

    def fail(self, status: int, message: str) -> None:
        """A request the relay refuses: answered in turn, then the connection closes."""
        self.broken = True
        self.closing = True
        call = self.reading or RestCall(self.proxy, self)
        self.reading = None
        call.close_after = True
        call.openai = call.openai or call.target.startswith(OPENAI_PREFIX)
        call.error = (status, message)
        if self.active is None:
            self.active = call
            call.start()
        else:
            self.waiting.append(call)

    def queue(self, data: bytes) -> None:
        self._out.append(data)

    def flush(self) -> None:
        out = self._out
        if not out:
            return
        t = self.transport
        if t is None:
            out.clear()
            return
        t.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()

    def call_done(self, call: RestCall) -> None:
        """``call`` was answered: the next pipelined one, or close, or wait for the next request."""
        if call is not self.active:
            return
        self.active = None
        self.flush()
        if call.close_after or (self.closing and not self.waiting and self.reading is None):
            self.flush()
            if self.transport is not None:
                self.transport.close()
            return
        self.last_progress = self.proxy.loop_time()
        if self.waiting:
            nxt = self.waiting.popleft()
            if self.paused_reading and len(self.waiting) < MAX_PIPELINED // 2 and self.transport is not None:
                self.paused_reading = False
                self.transport.resume_reading()
            self.active = nxt
            nxt.start()

    def idle(self) -> bool:
        return self.active is None and self.reading is None and not self.waiting

    def close(self) -> None:
        if self.transport is not None:
            self.flush()
            self.transport.close()


class RestProxy:
    """The HTTP/1.1 listeners of one balancer process, over the same pools as the gRPC relay."""

    def __init__(self, router: Router, pools: dict[str, Pool], cfg: RestConfig, *, clock: Clock = MONOTONIC,
                 rng: random.Random | None = None) -> None:
        self.router = router
        self.pools = pools
        self.cfg = cfg
        self.clock = clock
        self.rng = rng if rng is not None else random.Random()
        self.connections: set[RestConnection] = set()
        self.servers: list[asyncio.AbstractServer] = []
        self.in_flight = 0
        self.draining_connections = False
        self.idle: asyncio.Event | None = None
        self._idempotent = [p.encode() for p in cfg.idempotent_paths]
        self._model_body = frozenset(p.encode() for p in cfg.model_body_paths if not any(c in p for c in "*?["))
        self._model_body_globs = [p.encode() for p in cfg.model_body_paths if any(c in p for c in "*?[")]
        self._idem_cache: dict[bytes, bool] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: tokens, allow lists and rate limits (balancer/guard.py); None = off
        self.guard: Guard | None = None
        #: TLS on the listeners (ALPN http/1.1); None = cleartext
        self.ssl: ssl.SSLContext | None = None
        for pool in pools.values():
            pool.ready_listeners.append(lambda p=pool: self.release_held(p))
        #: some pool pins sequences: inference requests are looked at for a ``sequence_id``
        self.pins_sequences = any(p.config.sequence_affinity for p in pools.values())

    def loop_time(self) -> float:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop.time()

    # ------------------------------------------------------------------ request classes

    def is_idempotent_path(self, path: bytes) -> bool:
        hit = self._idem_cache.get(path)
        if hit is None:
            hit = any(fnmatch.fnmatchcase(path.decode("latin-1"), p.decode()) for p in self._idempotent)
            if len(self._idem_cache) < 10_000:  # client-chosen paths must not grow memory forever
                self._idem_cache[path] = hit
        return hit

    def reads_model_from_body(self, path: bytes) -> bool:
        if path in self._model_body:
            return True
        return bool(self._model_body_globs) and any(
            fnmatch.fnmatchcase(path.decode("latin-1"), p.decode()) for p in self._model_body_globs)

    def build_forward(self, call: RestCall, ep: Endpoint) -> list[bytes]:
        """The request as sent to an endpoint: origin head without hop-by-hop fields, a Content-Length
        for the body read whole, ``traceparent`` as received; then the body."""
        parts = [call.method, b" ", call.target, b" HTTP/1.1\r\n"]
        if not call.has_host:
            parts += (b"host: ", (ep.http or "").encode(), b"\r\n")
        for name, value in call.headers:
            parts += (name, b": ", value, b"\r\n")
        if call.body_len or call.method in (b"POST", b"PUT", b"PATCH"):
            parts.append(b"content-length: %d\r\n" % call.body_len)
        tp = call.traceparent if call.trace is None else call.trace.traceparent  # as received, or our span
        if tp is not None:
            parts += (b"traceparent: ", tp, b"\r\n")
        parts.append(b"\r\n")
        head = b"".join(parts)
        body = call.body
        if not body:
            return [head]
        if call.body_len <= 65536:
            return [head + b"".join(body)]
        return [head, *body]

    # ------------------------------------------------------------------ scale from zero

    def hold(self, call: RestCall, pool: Pool) -> None:
        act = pool.config.activator
        if len(pool.held) >= act.max_requests:
            pool.stats.count(pool.name, "held_overflow")
            call.reply_error(503, f"pool '{pool.name}' has no replica yet and already holds {len(pool.held)} "
                                  "requests (activator.max_requests)")
            return
        pool.stats.count(pool.name, "held")
        call.state = HELD
        timer = asyncio.get_running_loop().call_later(act.timeout, self._held_too_long, call, pool)
        pool.hold(call, timer)

    def _held_too_long(self, call: RestCall, pool: Pool) -> None:
        if pool.unhold(call):
            pool.stats.count(pool.name, "held_timeout")
            call.reply_error(503, f"pool '{pool.name}' has no endpoint: no replica became ready within "
                                  f"{pool.config.activator.timeout:g}s")

    def release_held(self, pool: Pool) -> None:
        for call in pool.take_held(RestCall):
            call.state = ROUTING
            call.attempt()

    # ------------------------------------------------------------------ listening

    async def listen(self, address: str, reuse_port: bool = False) -> int:
        """Serve on ``host:port``; returns the bound port."""
        host, _, port = address.rpartition(":")
        loop = asyncio.get_running_loop()
        self._loop = loop
        server = await loop.create_server(lambda: RestConnection(self), host.strip("[]") or None, int(port),
                                          reuse_port=reuse_port or None, backlog=1024, ssl=self.ssl)
        self.servers.append(server)
        if self._sweeper is None:
            self._sweeper = loop.create_task(self._sweep())
        return int(server.sockets[0].getsockname()[1])

    async def _sweep(self) -> None:
        """Once a second: slow and idle clients, idle endpoint connections (no timer per request)."""
        cfg = self.cfg
        while True:
            await asyncio.sleep(min(1.0, cfg.header_timeout / 2, cfg.idle_timeout / 2))
            now = self.loop_time()
            for c in list(self.connections):
                if c.reading is not None and c.active is None and not c.waiting:
                    head_done = c.reading.method != b""
                    if (not head_done and now - c.message_started > cfg.header_timeout) or \
                            (head_done and now - c.last_progress > cfg.idle_timeout):
                        c.fail(408, "request not received in time (rest.header_timeout / rest.idle_timeout)")
                        c.flush()
                elif c.idle() and now - c.last_progress > cfg.idle_timeout:
                    c.close()
            for pool in self.pools.values():
                for ep in list(pool.endpoints.values()):
                    if ep.http_upstream is not None:
                        ep.http_upstream.close_idle(now - cfg.upstream_idle_timeout)

    async def shutdown(self, grace: float | None) -> None:
        """Stop accepting, close idle connections, let in-flight requests finish (up to ``grace`` s)."""
        self.draining_connections = True
        for s in self.servers:
            s.close()
        for c in list(self.connections):
            c.closing = True
            if c.idle():
                c.close()
        if grace and self.in_flight:
            self.idle = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.idle.wait(), grace)
        for c in list(self.connections):
            c.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for s in self.servers:
            await s.wait_closed()
        self.servers.clear()


def http_upstream_factory(cfg: RestConfig, connect_timeout: float, tls: ssl.SSLContext | None = None,
                          server_name: str = "") -> Callable[[str], HttpUpstream]:
    """What a pool calls to make an endpoint's HTTP connections (over TLS with ``tls``)."""
    return lambda address: HttpUpstream(address, connect_timeout, cfg.upstream_max_idle, tls, server_name)
