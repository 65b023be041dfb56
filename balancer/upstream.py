"""Connections to one upstream endpoint: up to ``channels`` HTTP/2 connections, streams spread over them.

A connection is usable the moment it is created: the preface, our SETTINGS and the
first streams are queued and written when TCP connects (HTTP/2 lets a client send
before the server's SETTINGS arrive). A failed connect puts the endpoint in a short
backoff (100 ms doubling to 2 s) during which :meth:`Upstream.connection` returns
None, so the proxy retries elsewhere at once instead of queueing behind a dead host.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

from modelyard.balancer.h2.connection import (
    MAX_STREAM_ID,
    NO_ERROR,
    PREFACE,
    PROTOCOL_ERROR,
    S_ENABLE_PUSH,
    SETTINGS_TIMEOUT,
    Flusher,
    H2Connection,
    H2ProtocolError,
    Stream,
    StreamHandler,
)
from modelyard.balancer.h2.hpack import Headers

BACKOFF_MIN = 0.1
BACKOFF_MAX = 2.0


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


async def open_connection(protocol: asyncio.Protocol, address: str, connect_timeout: float,
                          tls: ssl.SSLContext | None, server_name: str) -> str | None:
    """Connect ``protocol`` to ``host:port`` (over TLS with ``tls``, checked against ``server_name``
    or the host); None when connected, else why not. Cancellation propagates."""
    try:
        host, port = split_address(address)
        await asyncio.wait_for(asyncio.get_running_loop().create_connection(
            lambda: protocol, host, port, ssl=tls,
            server_hostname=(server_name or host) if tls is not None else None), connect_timeout)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # OSError, timeout, a TLS failure, and e.g. OverflowError for a bad port
        return f"timed out after {connect_timeout:g} s" if isinstance(exc, TimeoutError) else \
            (getattr(exc, "strerror", None) or str(exc) or type(exc).__name__)
    return None


class UpstreamConnection(H2Connection):
    """The client side of one HTTP/2 connection to an endpoint."""

    local_settings = {**H2Connection.local_settings, S_ENABLE_PUSH: 0}

    def __init__(self, upstream: Upstream) -> None:
        super().__init__(upstream.flusher)
        self.upstream = upstream
        self.next_sid = 1
        self.connected = False
        #: no new streams (GOAWAY received, ids exhausted, or closing)
        self.retiring = False
        #: set when the last stream closes while retiring (Upstream.close waits on it)
        self.idle: asyncio.Event | None = None
        self._settings_timer: asyncio.TimerHandle | None = None
        self._lost_reason = ""
        self.write(PREFACE + self._open_frames())

    # ------------------------------------------------------------------ lifecycle

    async def connect(self) -> None:
        up = self.upstream
        try:
            reason = await open_connection(self, up.address, up.connect_timeout, up.ssl, up.server_name)
        except asyncio.CancelledError:
            self._fail_all(f"connect to {up.address} cancelled")
            raise
        if reason is not None:
            up.connect_failed(self, reason)
            self._fail_all(f"connect to {up.address} failed: {reason}")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._start_transport(transport)
        self.connected = True
        self.flush()
        # a peer that accepts TCP but never speaks HTTP/2 would hold our streams (and the
        # window they wait for) forever: its SETTINGS must come within the connect timeout
        self._settings_timer = asyncio.get_running_loop().call_later(self.upstream.connect_timeout,
                                                                     self._no_settings)

    def on_settings(self) -> None:
        if self._settings_timer is not None:
            self._settings_timer.cancel()
            self._settings_timer = None
            self.upstream.connect_succeeded()

    def _no_settings(self) -> None:
        self._settings_timer = None
        reason = f"no HTTP/2 SETTINGS within {self.upstream.connect_timeout:g} s (not a gRPC server?)"
        self.upstream.connect_failed(self, reason)
        self._lost_reason = reason
        self._fail_connection(SETTINGS_TIMEOUT, "settings timeout")

    def on_connection_failed(self, reason: str) -> None:
        self._fail_all(self._lost_reason or f"upstream {self.upstream.address} broke HTTP/2: {reason}")

    def connection_lost(self, exc: Exception | None) -> None:
        if self._settings_timer is not None:
            self._settings_timer.cancel()
            self._settings_timer = None
        reason = self._lost_reason or f"connection to {self.upstream.address} lost" + (f": {exc}" if exc else "")
        self._fail_all(reason)

    def _fail_all(self, reason: str) -> None:
        self.closed = True
        self.upstream.forget(self)
        streams = list(self.streams.values())
        self.streams.clear()
        for st in streams:
            self.forget(st)
            handler, st.handler = st.handler, None
            if handler is not None:
                handler.on_failed(reason)
        self._set_idle()

    def _set_idle(self) -> None:
        if self.idle is not None and not self.streams:
            self.idle.set()

    # ------------------------------------------------------------------ streams

    def open_stream(self, handler: StreamHandler) -> Stream:
        sid = self.next_sid
        self.next_sid += 2
        if self.next_sid > MAX_STREAM_ID:
            self.retire()
        st = Stream(sid, self)
        st.handler = handler
        self.streams[sid] = st
        return st

    def _idle(self, sid: int) -> bool:
        return not sid & 1 or sid >= self.next_sid  # the server opens no streams (push is disabled)

    def on_headers(self, sid: int, headers: Headers, end_stream: bool) -> None:
        st = self.streams.get(sid)
        if st is None:
            if self._idle(sid):
                raise H2ProtocolError(PROTOCOL_ERROR, f"HEADERS on idle stream {sid}")
            return  # a stream we already reset
        if end_stream:
            st.remote_closed = True
        if st.handler is not None:
            st.handler.on_headers(headers, end_stream)
        if end_stream:
            self._remote_close(st)

    def on_data(self, st: Stream, data: bytes, end_stream: bool) -> None:
        if st.handler is not None:
            st.handler.on_data(data, end_stream)

    def on_reset(self, st: Stream, code: int) -> None:
        if st.handler is not None:
            # REFUSED_STREAM: the server did not process it (RFC 9113 8.7), like streams above a GOAWAY's last id
            st.handler.on_failed(f"upstream {self.upstream.address} reset the stream (HTTP/2 error {code})")

    def on_goaway(self, last_stream: int, code: int, debug: bytes) -> None:
        self.retire()
        for sid in [s for s in self.streams if s > last_stream]:
            st = self.streams.pop(sid)
            self.forget(st)
            handler, st.handler = st.handler, None
            if handler is not None:
                handler.on_failed(f"upstream {self.upstream.address} is going away")
        if not self.streams:
            self._set_idle()
            self.close()

    def stream_closed(self, st: Stream) -> None:
        st.handler = None
        if self.retiring and not self.streams:
            self._set_idle()
            self.close()

    def retire(self) -> None:
        """Take no new streams; close once the current ones finish."""
        if not self.retiring:
            self.retiring = True
            self.upstream.forget(self)


class Upstream:
    """Up to ``channels`` connections to one address, used round-robin."""

    __slots__ = ("_rr", "address", "backoff", "channels", "closed", "connect_timeout", "conns", "flusher",
                 "last_error", "retry_at", "server_name", "ssl", "tasks")

    def __init__(self, address: str, channels: int, flusher: Flusher, connect_timeout: float = 1.0,
                 tls: ssl.SSLContext | None = None, server_name: str = "") -> None:
        self.address = address
        #: TLS to the endpoint (ALPN h2), checked against ``server_name`` (else the address's host)
        self.ssl = tls
        self.server_name = server_name
        self.channels = max(1, channels)
        self.connect_timeout = connect_timeout
        self.flusher = flusher
        self.conns: list[UpstreamConnection] = []
        self._rr = 0
        self.retry_at = 0.0
        self.backoff = BACKOFF_MIN
        self.last_error = ""
        self.closed = False
        self.tasks: set[asyncio.Task[None]] = set()

    def connection(self) -> UpstreamConnection | None:
        """A connection to open the next stream on; None while connecting is in backoff."""
        conns = self.conns
        n = len(conns)
        if n >= self.channels:
            self._rr += 1
            c = conns[self._rr % n]
            if len(c.streams) < c.peer_max_streams:
                return c
            # at the server's SETTINGS_MAX_CONCURRENT_STREAMS: another connection, or let the
            # server refuse the stream (REFUSED_STREAM is retried like a refused connection)
            return min(conns, key=lambda x: len(x.streams) / max(1, x.peer_max_streams))
        loop = asyncio.get_running_loop()
        if self.closed or loop.time() < self.retry_at:
            return conns[0] if n else None
        c = UpstreamConnection(self)
        conns.append(c)
        task = loop.create_task(c.connect())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return c

    def connect_failed(self, conn: UpstreamConnection, reason: str) -> None:
        self.forget(conn)
        self.last_error = reason
        self.retry_at = asyncio.get_running_loop().time() + self.backoff
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)

    def connect_succeeded(self) -> None:
        self.backoff = BACKOFF_MIN

    def forget(self, conn: UpstreamConnection) -> None:
        with contextlib.suppress(ValueError):
            self.conns.remove(conn)

    async def close(self, grace: float | None = None) -> None:
        """GOAWAY every connection, let streams finish for up to ``grace`` seconds, then close."""
        self.closed = True
        conns = list(self.conns)
        for c in conns:
            c.retire()
            if not c.closed and c.connected:
                c.send_goaway(NO_ERROR)
        busy = [c for c in conns if c.streams]
        if grace and busy:
            for c in busy:
                c.idle = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(c.idle.wait() for c in busy if c.idle)), grace)
        for c in conns:
            c.close()
        for t in list(self.tasks):
            t.cancel()
