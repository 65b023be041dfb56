"""The server side of the proxy: one HTTP/2 connection from a client, its streams handed to the proxy as calls."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from modelyard.balancer.h2.connection import (
    NO_ERROR,
    PREFACE,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    S_MAX_CONCURRENT_STREAMS,
    H2Connection,
    H2ProtocolError,
    Stream,
)
from modelyard.balancer.h2.hpack import Headers, encode

if TYPE_CHECKING:
    from modelyard.balancer.proxy import Proxy

#: most downstream streams one connection may have open (advertised in SETTINGS)
MAX_CONCURRENT_STREAMS = 4096


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
            if st.handler is not None:
                st.handler.on_failed("the client connection closed")

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
                if st.handler is not None:
                    st.handler.on_data(b"", True)
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
        handler = st.handler
        if handler is not None:
            handler.on_data(data, end_stream)

    def on_reset(self, st: Stream, code: int) -> None:
        if st.handler is not None:
            st.handler.on_failed(f"the client reset the stream (HTTP/2 error {code})")

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
