"""Keep-alive HTTP/1.1 connections to one endpoint's HTTP address, one request at a time each.

:meth:`HttpUpstream.acquire` hands out the most recently used idle connection (LIFO keeps the set of
warm connections small), or a new one that is usable at once: the request is written when TCP
connects. A failed connect puts the endpoint in the same 100 ms -> 2 s backoff as the gRPC side's
:class:`~modelyard.balancer.upstream.Upstream`, during which ``acquire`` returns None and the relay
fails over at once. Responses are parsed with httptools (llhttp, the parser of Node.js): strict
framing (Content-Length, chunked), bodies delivered as they arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Protocol, cast

import httptools

from modelyard.balancer.upstream import BACKOFF_MAX, BACKOFF_MIN, open_connection


class ResponseHandler(Protocol):
    """What a connection tells the request it carries (the relay's call)."""

    def upstream_head(self, conn: HttpConnection, status: int, headers: list[tuple[bytes, bytes]],
                      chunked: bool, has_length: bool) -> None: ...

    def upstream_body(self, conn: HttpConnection, data: bytes) -> None: ...

    def upstream_done(self, conn: HttpConnection, keep_alive: bool) -> None: ...

    def upstream_failed(self, conn: HttpConnection, reason: str) -> None: ...

    def flush(self) -> None: ...


class HttpConnection(asyncio.Protocol):
    """One HTTP/1.1 client connection to an endpoint."""

    def __init__(self, upstream: HttpUpstream) -> None:
        self.upstream = upstream
        self.transport: asyncio.Transport | None = None
        self.handler: ResponseHandler | None = None
        self.connected = False
        self.closed = False
        #: request bytes were handed to the socket (the server may have seen them)
        self.sent = False
        #: the connection carried a request before (a reused keep-alive connection)
        self.reused = False
        self.idle_since = 0.0
        self._out: list[bytes] | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._chunked = False
        self._has_length = False
        self._interim = False
        #: the response to a HEAD request has no body, whatever its Content-Length says
        self._head_request = False
        #: the body runs until the connection closes (no Content-Length, not chunked)
        self._until_close = False
        self._got_head = False

    # ------------------------------------------------------------------ lifecycle

    async def connect(self) -> None:
        up = self.upstream
        try:
            reason = await open_connection(self, up.address, up.connect_timeout, up.ssl, up.server_name)
        except asyncio.CancelledError:
            self._lost(f"connect to {up.address} cancelled")
            raise
        if reason is not None:
            up.connect_failed(reason)
            self._lost(f"connect to {up.address} failed: {reason}")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods
        if self.closed:  # closed while connecting
            transport.close()
            return
        self.transport = cast(asyncio.Transport, transport)
        self.connected = True
        self.upstream.connect_succeeded()
        out, self._out = self._out, None
        if out:
            t = self.transport
            t.writelines(out) if len(out) > 1 else t.write(out[0])
            self.sent = True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._until_close and self._got_head and self.handler is not None:
            handler, self.handler = self.handler, None  # the body ran until the close: complete
            self.closed = True
            self.upstream.forget(self)
            handler.upstream_done(self, False)
            handler.flush()
            return
        self._lost(f"connection to {self.upstream.address} lost" + (f": {exc}" if exc else ""))

    def _lost(self, reason: str) -> None:
        self.closed = True
        self.upstream.forget(self)
        handler, self.handler = self.handler, None
        if handler is not None:
            handler.upstream_failed(self, reason)

    def close(self) -> None:
        """Close now; a request on it is failed (its handler is told)."""
        if self.transport is not None:
            self.transport.close()
        else:
            self._lost("closed")
        self.closed = True
        self.upstream.forget(self)

    def detach(self) -> None:
        """The handler is done with this connection mid-response: close it without telling anyone."""
        self.handler = None
        self.close()

    @property
    def usable(self) -> bool:
        t = self.transport
        return not self.closed and (t is None or not t.is_closing())

    # ------------------------------------------------------------------ one request

    def send(self, handler: ResponseHandler, data: list[bytes], head_request: bool) -> None:
        """Write a request (head and body pieces) and deliver its response to ``handler``."""
        self.handler = handler
        self._parser = httptools.HttpResponseParser(self)
        self._headers = []
        self._chunked = self._has_length = self._interim = self._until_close = self._got_head = False
        self._head_request = head_request
        t = self.transport
        if t is None:
            self._out = data
            self.sent = False
            return
        self.reused = True
        t.writelines(data) if len(data) > 1 else t.write(data[0])
        self.sent = True

    def release(self) -> None:
        """The response was read whole: back to the endpoint's idle connections."""
        self.handler = None
        self._parser = None
        self.upstream.release(self)

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # ------------------------------------------------------------------ the response

    def data_received(self, data: bytes) -> None:
        handler = self.handler
        parser = self._parser
        if handler is None or parser is None:
            self.close()  # bytes nobody asked for (e.g. a 408 on an idle connection)
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self.handler is handler:  # not completed by a HEAD response before the garbage
                self.handler = None
                self.close()
                handler.upstream_failed(self, f"upstream {self.upstream.address} sent invalid HTTP/1.1: {exc}")
        handler.flush()

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost completes or fails the request

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        if lname == b"transfer-encoding":
            self._chunked = b"chunked" in value.lower()
        elif lname == b"content-length":
            self._has_length = True
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # an interim response (100 Continue, 103 Early Hints): not relayed
            self._interim = True
            self._headers = []
            return
        handler = self.handler
        if handler is None:
            return
        self._got_head = True
        no_body = self._head_request or status in (204, 304)
        self._until_close = not (no_body or self._chunked or self._has_length)
        handler.upstream_head(self, status, self._headers, self._chunked and not no_body,
                              self._has_length and not self._head_request)
        if no_body and self.handler is handler:
            # llhttp would wait for the body a HEAD response's Content-Length announces: done now,
            # and the connection is not reused (its parser state is unknown)
            self.handler = None
            self.closed = True
            handler.upstream_done(self, False)

    def on_body(self, data: bytes) -> None:
        handler = self.handler
        if handler is not None and not self._interim:
            handler.upstream_body(self, data)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        handler = self.handler
        if handler is None:
            return
        assert self._parser is not None
        keep_alive = self._parser.should_keep_alive()
        self.handler = None
        handler.upstream_done(self, keep_alive)


class HttpUpstream:
    """Keep-alive HTTP/1.1 connections to one address."""

    __slots__ = ("address", "backoff", "busy", "closed", "connect_timeout", "idle", "last_error", "max_idle",
                 "quiet", "retry_at", "server_name", "ssl", "tasks")

    def __init__(self, address: str, connect_timeout: float = 1.0, max_idle: int = 64,
                 tls: ssl.SSLContext | None = None, server_name: str = "") -> None:
        self.address = address
        #: HTTPS to the endpoint (ALPN http/1.1), checked against ``server_name`` (else the address's host)
        self.ssl = tls
        self.server_name = server_name
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        #: idle connections, the most recently used last
        self.idle: list[HttpConnection] = []
        #: connections carrying a request (or connecting)
        self.busy: set[HttpConnection] = set()
        self.retry_at = 0.0
        self.backoff = BACKOFF_MIN
        self.last_error = ""
        self.closed = False
        self.tasks: set[asyncio.Task[None]] = set()
        #: set when the last busy connection is done (``close`` waits on it)
        self.quiet: asyncio.Event | None = None

    def acquire(self) -> HttpConnection | None:
        """A connection for one request; None while connecting is in backoff (or once closed)."""
        idle = self.idle
        while idle:
            c = idle.pop()
            if c.usable:
                self.busy.add(c)
                return c
        loop = asyncio.get_running_loop()
        if self.closed or loop.time() < self.retry_at:
            return None
        c = HttpConnection(self)
        self.busy.add(c)
        task = loop.create_task(c.connect())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return c

    def release(self, conn: HttpConnection) -> None:
        self.busy.discard(conn)
        if not self.busy and self.quiet is not None:
            self.quiet.set()
        if self.closed or not conn.usable or len(self.idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = asyncio.get_running_loop().time()
        self.idle.append(conn)

    def forget(self, conn: HttpConnection) -> None:
        self.busy.discard(conn)
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)
        if not self.busy and self.quiet is not None:
            self.quiet.set()

    def connect_failed(self, reason: str) -> None:
        self.last_error = reason
        self.retry_at = asyncio.get_running_loop().time() + self.backoff
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)

    def connect_succeeded(self) -> None:
        self.backoff = BACKOFF_MIN

    def close_idle(self, older_than: float) -> None:
        """Close idle connections unused since ``older_than`` (loop time)."""
        for c in [c for c in self.idle if c.idle_since < older_than]:
            c.close()

    async def close(self, grace: float | None = None) -> None:
        """No new requests; close idle connections now and busy ones after ``grace`` seconds."""
        self.closed = True
        for c in list(self.idle):
            c.close()
        if grace and self.busy:
            self.quiet = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.quiet.wait(), grace)
        for c in list(self.busy):
            c.close()
        for t in list(self.tasks):
            t.cancel()
