"""The server side of the proxy: one HTTP/2 connection from a client, its streams handed to the proxy as calls.

A client connection is ``guarded`` (see :mod:`modelyard.balancer.h2.connection`) and held to the
proxy's :class:`~modelyard.balancer.limits.LimitsConfig`: connections, concurrent streams, early
resets (rapid reset, CVE-2023-44487), the preface and idle timeouts.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from modelyard.balancer.h2.connection import (
    CLOSE_GRACE,
    ENHANCE_YOUR_CALM,
    NO_ERROR,
    PREFACE,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    S_MAX_CONCURRENT_STREAMS,
    SETTINGS_TIMEOUT,
    H2Connection,
    H2ProtocolError,
    Stream,
)
from modelyard.balancer.h2.hpack import Headers, encode
from modelyard.security.guard import peer_address

if TYPE_CHECKING:
    from modelyard.balancer.proxy import Proxy

log = logging.getLogger("modelyard.balancer.h2")

#: advertised before the limits are known (the class attribute); each connection advertises its limit
MAX_CONCURRENT_STREAMS = 100


class _Opening:
    """The handler of a stream opened in this turn by a client that already reset a stream early: its
    call starts when the turn ends, with the events collected meanwhile, so a stream the client resets
    in the same read (rapid reset, CVE-2023-44487) never reaches a backend. Clients that never did pay
    nothing for it."""

    __slots__ = ("end", "events", "failed", "headers")

    def __init__(self, headers: Headers, end: bool) -> None:
        self.headers = headers
        self.end = end
        self.events: list[tuple[bytes, bool]] = []
        self.failed = False

    def on_headers(self, headers: Headers, end: bool) -> None:
        if end:
            self.events.append((b"", True))

    def on_data(self, data: bytes, end: bool) -> None:
        self.events.append((data, end))

    def on_failed(self, reason: str) -> None:
        self.failed = True


def _deadline_passed(deadline: float | None, start: float, now: float) -> bool:
    """A reset at (or within a tenth of the timeout, 5 ms at least, before) the call's own deadline is
    the client giving up on time, not a premature reset: a client that queued calls behind
    max_concurrent_streams opens them close to their deadlines and cancels them soon after."""
    return deadline is not None and now >= deadline - max(0.005, 0.1 * (deadline - start))


class DownstreamConnection(H2Connection):
    """The server side of one client connection."""

    transport: Any
    last_peer_stream: int

    local_settings = {**H2Connection.local_settings, S_MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS}
    credit_on_receipt = False
    guarded = True

    def __init__(self, proxy: Proxy) -> None:
        lim = proxy.limits
        super().__init__(proxy.flusher, lim)
        self.local_settings[S_MAX_CONCURRENT_STREAMS] = lim.max_concurrent_streams
        self.max_streams = lim.max_concurrent_streams
        self.proxy = proxy
        self._preface = b""
        self._preface_done = False
        #: streams the client opened, and those it reset early or that were refused or reset for its errors
        self.streams_opened = 0
        self.early_resets = 0
        #: the preface timer until the client's SETTINGS arrive, then the idle check
        self._timer: asyncio.TimerHandle | None = None
        self._settled = False
        #: streams opened in the current turn, their calls not started yet (see _Opening); from the first
        #: early reset on, every new stream of the connection waits for the end of its turn
        self._opening: list[Stream] = []
        self._defer = False
        self._idle_mark = -1
        self._idle_was_empty = False
        #: the client's address, host:port (the rate limiter's key, its host, for a caller without a token)
        self.peer = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._start_transport(transport)
        self.peer = peer_address(transport.get_extra_info("peername"))
        proxy = self.proxy
        lim = self.limits
        self.write(self._open_frames())
        if len(proxy.connections) >= lim.max_connections:
            log.debug("refusing a client connection: %d open (limits.max_connections)", len(proxy.connections))
            self._fail_connection(ENHANCE_YOUR_CALM, f"over {lim.max_connections} connections")
            return
        proxy.connections.add(self)
        self._timer = asyncio.get_running_loop().call_later(lim.preface_timeout, self._no_preface)
        if proxy.draining_connections:
            self.send_goaway()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.proxy.connections.discard(self)
        self._drop_streams("the client connection closed")
        self.transport = None  # no cycle with the transport: freed at once, caches and all

    def on_connection_failed(self, reason: str) -> None:
        self._drop_streams(f"the client connection failed: {reason}")

    def _drop_streams(self, reason: str) -> None:
        streams = list(self.streams.values())
        self.streams.clear()
        for st in streams:
            if st.handler is not None:
                st.handler.on_failed(reason)

    # ------------------------------------------------------------------ timers

    def _no_preface(self) -> None:
        """``preface_timeout`` after the connection opened: the preface and SETTINGS must have come, and the
        ACK of ours; then the same timer checks for idleness (one timer per connection, none per stream)."""
        self._timer = None
        if self.closed:
            return
        t = self.limits.preface_timeout
        if not self._settled:
            log.debug("client sent no HTTP/2 preface and SETTINGS within %g s", t)
            self._fail_connection(PROTOCOL_ERROR, f"no HTTP/2 preface and SETTINGS within {t:g} s")
            return
        if not self.settings_acked:  # RFC 9113 6.5.3; until it does, it may exceed our stream limit
            log.debug("client did not acknowledge our SETTINGS within %g s", t)
            self._fail_connection(SETTINGS_TIMEOUT, f"SETTINGS not acknowledged within {t:g} s")
            return
        if self.limits.idle_timeout:
            self._idle_check()

    def on_settings(self) -> None:
        self._settled = True

    def _idle_check(self) -> None:
        """Every ``idle_timeout``: GOAWAY once no stream was open since the previous check."""
        self._timer = None
        if self.closed:
            return
        mark = self.last_peer_stream
        empty = not self.streams
        if empty and self._idle_was_empty and mark == self._idle_mark and not self.goaway_sent:
            log.debug("closing a client connection idle for over %g s", self.limits.idle_timeout)
            self.send_goaway(NO_ERROR, "idle")
            # streams the client sent before it read the GOAWAY are refused (it retries them elsewhere)
            asyncio.get_running_loop().call_later(CLOSE_GRACE, self._close_if_idle)
            return
        self._idle_mark = mark
        self._idle_was_empty = empty
        self._timer = asyncio.get_running_loop().call_later(self.limits.idle_timeout, self._idle_check)

    def _close_if_idle(self) -> None:
        if not self.closed and not self.streams:
            self.close()

    # ------------------------------------------------------------------ frames

    def _receive(self, data: bytes) -> None:
        if self._preface_done:
            super()._receive(data)
            if self._opening:
                self._open_calls()
            return
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
        if data:
            super()._receive(data)
            if self._opening:
                self._open_calls()

    def _open_calls(self) -> None:
        """The turn is over: start the calls of the streams it opened that are still open."""
        opening, self._opening = self._opening, []
        new_call = self.proxy.new_call
        for st in opening:
            h = st.handler
            if not isinstance(h, _Opening) or h.failed:
                continue  # reset (by the client, or by us for its error) before its call started
            st.handler = None
            new_call(st, h.headers, h.end)
            for data, end in h.events:
                handler = st.handler
                if handler is None:
                    break  # answered at once (not gRPC, no route...): the rest goes nowhere
                handler.on_data(data, end)

    def _idle(self, sid: int) -> bool:
        return not sid & 1 or sid > self.last_peer_stream

    def _bad_stream(self) -> None:
        """A stream reset early, refused or reset for the client's error: a rapid-reset flood ends here."""
        self._defer = True
        self.early_resets = n = self.early_resets + 1
        lim = self.limits
        if n >= lim.reset_limit and n >= lim.reset_ratio * self.streams_opened:
            raise H2ProtocolError(ENHANCE_YOUR_CALM, f"{n} of {self.streams_opened} streams reset early "
                                                     f"(limits.reset_limit, reset_ratio)")

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
                if st.handler is not None:
                    st.handler.on_data(b"", True)
                self._remote_close(st)
            return
        if sid % 2 == 0:
            raise H2ProtocolError(PROTOCOL_ERROR, f"client stream id {sid} is even")
        if sid <= self.last_peer_stream:
            return  # trailers or a late frame on a stream we already ended (RFC 7540 5.1): ignore
        self.last_peer_stream = sid
        self.streams_opened += 1
        st = Stream(sid, self)
        self.streams[sid] = st
        if end_stream:
            st.remote_closed = True
        if self.goaway_sent:
            self.reset(st, REFUSED_STREAM)
            return
        if len(self.streams) > self.max_streams:  # over what we advertised
            if self.settings_acked:  # it knew (RFC 9113 5.1.2; what nghttp2 does)
                raise H2ProtocolError(PROTOCOL_ERROR, f"over the {self.max_streams} concurrent streams allowed")
            self.reset(st, REFUSED_STREAM)  # it may not have seen our SETTINGS yet
            self._bad_stream()
            return
        if self._defer:
            st.handler = _Opening(headers, end_stream)
            self._opening.append(st)
        else:
            self.proxy.new_call(st, headers, end_stream)

    def on_data(self, st: Stream, data: bytes, end_stream: bool) -> None:
        handler = st.handler
        if handler is not None:
            handler.on_data(data, end_stream)
        else:  # the call is over: its bytes go nowhere, and hold no connection window
            self._release(st)

    def on_reset(self, st: Stream, code: int) -> None:
        handler = st.handler
        if handler is not None:
            handler.on_failed(f"the client reset the stream (HTTP/2 error {code})")
            if isinstance(handler, _Opening):
                self._bad_stream()  # reset in the read that opened it
            else:
                start: float | None = getattr(handler, "start", None)
                now = self.proxy.clock.now()
                if start is not None and now - start < self.limits.reset_min_age \
                        and not _deadline_passed(getattr(handler, "deadline", None), start, now):
                    self._bad_stream()

    def on_stream_error(self, st: Stream) -> None:
        self._bad_stream()

    def stream_closed(self, st: Stream) -> None:
        st.handler = None
        if self.goaway_sent and not self.streams and self.proxy.draining_connections:
            self.close()

    def respond_http(self, st: Stream, status: bytes, message: str) -> None:
        """A plain HTTP error for a request that is not gRPC."""
        self.send_headers(st, encode(((b":status", status), (b"content-type", b"text/plain"))), False)
        self.send_data(st, message.encode() + b"\n", True)
        if not st.remote_closed:
            self.reset(st, NO_ERROR)
        self._bad_stream()  # not a gRPC request: counted like an early reset
