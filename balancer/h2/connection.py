"""HTTP/2 framing, flow control and connection state shared by both sides of the proxy.

Only what a gRPC relay needs: no server push, no priorities (ignored), no dynamic
table on the sending side. Both directions of a proxied call are streams on
different connections; each :class:`Stream` names its ``source`` (the stream whose
bytes it forwards), and the source's receive window is replenished only when those
bytes have actually been written on the other side -- end-to-end back-pressure with
bounded buffers, as Envoy does. The connection-level receive window is large and
replenished on receipt, so one stalled stream cannot starve the others.

Writes are collected per connection and flushed once per batch of received bytes
(:class:`Flusher`), so a burst of frames costs one ``transport.write``.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from typing import Any, Protocol

from modelyard.balancer.h2.hpack import MAX_HEADER_LIST, Decoder, Headers, HpackError

log = logging.getLogger("modelyard.balancer.h2")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR, SETTINGS_TIMEOUT = 0, 1, 2, 3, 4
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 5, 6, 7, 8, 9

S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS = 1, 2, 3
S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = 4, 5, 6

DEFAULT_WINDOW = 65535
#: what we advertise: per-stream receive window, connection receive window, frame size
STREAM_WINDOW = 1 << 20
CONN_WINDOW = 1 << 24
MAX_FRAME = 16384
MAX_HEADER_BLOCK = 1 << 20
MAX_STREAM_ID = (1 << 31) - 1

_HDR = struct.Struct(">BHBBI")
_U32 = struct.Struct(">I")
_U32X2 = struct.Struct(">II")
_SETTING = struct.Struct(">HI")


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _HDR.pack(n >> 16, n & 0xFFFF, ftype, flags, sid) + payload


def settings_frame(settings: dict[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(k, v) for k, v in settings.items()))


def window_update(sid: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, sid, _U32.pack(increment))


class H2ProtocolError(Exception):
    """A connection-level protocol error: GOAWAY with ``code``, then close."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Flusher:
    """Coalesces writes: connections register when they first have bytes, all flush together.

    Inside ``data_received`` (depth > 0) the flush happens when the batch ends; writes
    from anywhere else (timers, tasks) schedule one flush with ``call_soon``.
    """

    __slots__ = ("depth", "dirty", "scheduled")

    def __init__(self) -> None:
        self.dirty: list[H2Connection] = []
        self.scheduled = False
        self.depth = 0

    def mark(self, conn: H2Connection) -> None:
        self.dirty.append(conn)
        if not self.depth and not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.run)

    def run(self) -> None:
        self.scheduled = False
        while self.dirty:
            dirty, self.dirty = self.dirty, []
            for c in dirty:
                try:
                    c.flush()
                except Exception:  # one broken transport must not keep the others' bytes back
                    log.exception("flushing an HTTP/2 connection failed")
                    c._wbuf.clear()


class StreamHandler(Protocol):
    """Where one stream's events go: the proxy's call for a client's stream, an attempt for an upstream one.

    ``on_headers`` gets a header block (``end``: it ended the stream, i.e. trailers or trailers-only),
    ``on_data`` the stream's bytes, ``on_failed`` why the stream can carry nothing more (reset,
    connection lost, refused by GOAWAY, connect failure).
    """

    def on_headers(self, headers: Headers, end: bool) -> None: ...

    def on_data(self, data: bytes, end: bool) -> None: ...

    def on_failed(self, reason: str) -> None: ...


class Stream:
    """One HTTP/2 stream on one connection; ``handler`` receives its events."""

    __slots__ = ("conn", "handler", "id", "local_closed", "pending", "recv_unacked", "remote_closed", "send_window",
                 "source")

    def __init__(self, sid: int, conn: H2Connection) -> None:
        self.id = sid
        self.conn = conn
        self.handler: StreamHandler | None = None
        self.source: Stream | None = None
        self.send_window = conn.peer_initial_window
        #: frames waiting for send window: (is_headers, payload, end_stream)
        self.pending: deque[tuple[bool, bytes, bool]] | None = None
        self.recv_unacked = 0
        self.local_closed = False
        self.remote_closed = False

    def __repr__(self) -> str:
        return f"Stream({self.id})"


class H2Connection(asyncio.Protocol):
    """Frame parsing, settings, pings, windows and the send queue; subclasses handle streams."""

    last_peer_stream: int
    #: SETTINGS we send right after the preface (subclasses may extend)
    local_settings: dict[int, int] = {S_INITIAL_WINDOW_SIZE: STREAM_WINDOW, S_MAX_FRAME_SIZE: MAX_FRAME,
                                      S_MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST}

    def __init__(self, flusher: Flusher) -> None:
        self.flusher = flusher
        self.transport: Any = None
        self._buf = b""
        self._wbuf: list[bytes] = []
        self.decoder = Decoder()
        self.streams: dict[int, Stream] = {}
        self.peer_max_frame = MAX_FRAME
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_streams = MAX_STREAM_ID
        self.send_window = DEFAULT_WINDOW
        self.recv_unacked = 0
        self._cont: tuple[int, int, bytearray] | None = None
        self._blocked: dict[Stream, None] = {}
        self.closed = False
        #: the transport's write buffer is over its high-water mark: hold DATA (and so the
        #: window credit of the streams it comes from) until it drains
        self.paused = False
        self.goaway_sent = False
        self.last_peer_stream: int = 0
        #: our next header block starts with a dynamic-table size update to 0 (we never index, and
        #: RFC 7541 4.2 wants the update after the peer changes SETTINGS_HEADER_TABLE_SIZE)
        self._table_update = True

    def _open_frames(self) -> bytes:
        return settings_frame(self.local_settings) + window_update(0, CONN_WINDOW - DEFAULT_WINDOW)

    # ------------------------------------------------------------------ writing

    def write(self, data: bytes) -> None:
        if not self._wbuf:
            self.flusher.mark(self)
        self._wbuf.append(data)

    def flush(self) -> None:
        if not self._wbuf or self.transport is None:
            return  # still connecting: connection_made flushes
        if not self.closed:
            self.transport.write(b"".join(self._wbuf) if len(self._wbuf) > 1 else self._wbuf[0])
        self._wbuf.clear()

    def send_headers(self, st: Stream, block: bytes, end: bool) -> None:
        """A header block on ``st`` (ordered after any DATA still waiting for window)."""
        if st.local_closed:
            return
        if st.pending:
            st.pending.append((True, block, end))
            return
        self._write_headers(st, block, end)

    def _write_headers(self, st: Stream, block: bytes, end: bool) -> None:
        if self._table_update:
            self._table_update = False
            block = b"\x20" + block
        flags = END_STREAM if end else 0
        n = len(block)
        mf = self.peer_max_frame
        if n <= mf:
            self.write(_HDR.pack(n >> 16, n & 0xFFFF, HEADERS, flags | END_HEADERS, st.id) + block)
        else:
            self.write(frame(HEADERS, flags, st.id, block[:mf]))
            for i in range(mf, n, mf):
                chunk = block[i:i + mf]
                last = i + mf >= n
                self.write(frame(CONTINUATION, END_HEADERS if last else 0, st.id, chunk))
        if end:
            self._local_close(st)

    def send_data(self, st: Stream, data: bytes, end: bool) -> None:
        """DATA on ``st``, now if the windows allow, else queued until WINDOW_UPDATE."""
        if st.local_closed:
            return
        n = len(data)
        if not st.pending and not self.paused and (
                n == 0 or (n <= st.send_window and n <= self.send_window and n <= self.peer_max_frame)):
            self._send_chunk(st, data, end)
            return
        if st.pending is None:
            st.pending = deque()
        st.pending.append((False, data, end))
        self._drain_stream(st)

    def _drain_stream(self, st: Stream) -> None:
        """Send what the windows allow from ``st.pending``; remember the stream if blocked."""
        q = st.pending
        mf = self.peer_max_frame
        if self.paused and q:
            self._blocked[st] = None
            return
        while q:
            is_headers, payload, end = q[0]
            if is_headers:
                q.popleft()
                self._write_headers(st, payload, end)
                continue
            n = len(payload)
            allowed = min(st.send_window, self.send_window, mf)
            if n > allowed and n:
                if allowed <= 0:
                    self._blocked[st] = None
                    return
                chunk, rest = payload[:allowed], payload[allowed:]
                q[0] = (False, rest, end)
                self._send_chunk(st, chunk, False)
                continue
            q.popleft()
            self._send_chunk(st, payload, end)
        self._blocked.pop(st, None)

    def _send_chunk(self, st: Stream, chunk: bytes, end: bool) -> None:
        n = len(chunk)
        st.send_window -= n
        self.send_window -= n
        self.write(frame(DATA, END_STREAM if end else 0, st.id, chunk))
        src = st.source
        if src is not None and n:
            src.conn.consumed(src, n)
        if end:
            self._local_close(st)

    def _unblock(self) -> None:
        for st in list(self._blocked):
            if self.paused:
                return
            self._drain_stream(st)  # decides per stream: headers and empty END_STREAM need no window

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self._blocked:
            self._unblock()

    def _start_transport(self, transport: Any) -> None:
        self.transport = transport
        # a deeper buffer than asyncio's 64 KiB default: pausing is for slow readers, not bursts
        transport.set_write_buffer_limits(high=1 << 20)

    def consumed(self, st: Stream, n: int) -> None:
        """``n`` bytes received on ``st`` were forwarded: give the peer that much window back."""
        if st.remote_closed or self.closed:
            return
        st.recv_unacked += n
        if st.recv_unacked >= STREAM_WINDOW // 4:
            self.write(window_update(st.id, st.recv_unacked))
            st.recv_unacked = 0

    def forget(self, st: Stream) -> None:
        """``st`` is over: drop what it still had queued (it must never reach the wire)."""
        st.local_closed = st.remote_closed = True
        st.pending = None
        self._blocked.pop(st, None)

    def reset(self, st: Stream, code: int) -> None:
        """RST_STREAM ``st`` and forget it."""
        if self.streams.pop(st.id, None) is None and st.local_closed and st.remote_closed:
            return
        self.forget(st)
        if not self.closed:
            self.write(frame(RST_STREAM, 0, st.id, _U32.pack(code)))
        self.stream_closed(st)

    def _local_close(self, st: Stream) -> None:
        st.local_closed = True
        if st.remote_closed and self.streams.pop(st.id, None) is not None:
            self._blocked.pop(st, None)
            self.stream_closed(st)

    def _remote_close(self, st: Stream) -> None:
        st.remote_closed = True
        if st.local_closed and self.streams.pop(st.id, None) is not None:
            self._blocked.pop(st, None)
            self.stream_closed(st)

    def send_goaway(self, code: int = NO_ERROR, message: str = "") -> None:
        self.goaway_sent = True
        self.write(frame(GOAWAY, 0, 0, _U32X2.pack(self.last_peer_stream, code) + message.encode()[:200]))

    def close(self) -> None:
        self.flush()
        if self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------------ reading

    def data_received(self, data: bytes) -> None:
        fl = self.flusher
        fl.depth += 1
        try:
            self._receive(data)
        except H2ProtocolError as exc:
            self._fail_connection(exc.code, str(exc))
        except Exception:  # a bug must cost one connection, never the process
            log.exception("HTTP/2 connection error")
            self._fail_connection(INTERNAL_ERROR, "internal error")
        finally:
            fl.depth -= 1
            if not fl.depth:
                fl.run()

    def _fail_connection(self, code: int, message: str) -> None:
        if self.closed:
            return
        self.send_goaway(code, message)
        self.close()
        self.closed = True

    def _receive(self, data: bytes) -> None:
        if self._buf:
            data = self._buf + data
        pos, n = 0, len(data)
        unpack = _HDR.unpack_from
        streams = self.streams
        while n - pos >= 9:
            hi, lo, ftype, flags, sid = unpack(data, pos)
            length = (hi << 16) | lo
            end = pos + 9 + length
            if length > MAX_FRAME:
                raise H2ProtocolError(FRAME_SIZE_ERROR, f"frame of {length} bytes over {MAX_FRAME}")
            if end > n:
                break
            payload = data[pos + 9:end]
            pos = end
            sid &= MAX_STREAM_ID
            if self._cont is not None and ftype != CONTINUATION:
                raise H2ProtocolError(PROTOCOL_ERROR, "expected CONTINUATION")
            if ftype == DATA:
                self.recv_unacked += length
                if self.recv_unacked >= CONN_WINDOW // 2:
                    self.write(window_update(0, self.recv_unacked))
                    self.recv_unacked = 0
                st = streams.get(sid)
                if st is None or st.remote_closed:
                    continue  # a stream we already reset or finished
                if flags & PADDED:
                    if not payload or payload[0] >= length:
                        raise H2ProtocolError(PROTOCOL_ERROR, "padding longer than the frame")
                    payload = payload[1:len(payload) - payload[0]]
                    self.consumed(st, length - len(payload))  # padding is never forwarded: give it back now
                if flags & END_STREAM:
                    st.remote_closed = True
                    self.on_data(st, payload, True)
                    self._remote_close(st)
                else:
                    self.on_data(st, payload, False)
            elif ftype == HEADERS:
                if flags & PADDED:
                    payload = payload[1:len(payload) - payload[0]]
                if flags & PRIORITY_FLAG:
                    payload = payload[5:]
                if not flags & END_HEADERS:
                    self._cont = (sid, flags, bytearray(payload))
                    continue
                self._headers(sid, payload, flags)
            elif ftype == CONTINUATION:
                if self._cont is None or self._cont[0] != sid:
                    raise H2ProtocolError(PROTOCOL_ERROR, "unexpected CONTINUATION")
                buf = self._cont[2]
                buf += payload
                if len(buf) > MAX_HEADER_BLOCK:
                    raise H2ProtocolError(PROTOCOL_ERROR, "header block too large")
                if flags & END_HEADERS:
                    csid, cflags, _ = self._cont
                    self._cont = None
                    self._headers(csid, bytes(buf), cflags)
            elif ftype == WINDOW_UPDATE:
                if length != 4:
                    raise H2ProtocolError(FRAME_SIZE_ERROR, "WINDOW_UPDATE of wrong size")
                inc = _U32.unpack(payload)[0] & MAX_STREAM_ID
                if sid == 0:
                    self.send_window += inc
                    if self._blocked:
                        self._unblock()
                else:
                    st = streams.get(sid)
                    if st is not None:
                        st.send_window += inc
                        if st.pending:
                            self._drain_stream(st)
            elif ftype == SETTINGS:
                if not flags & ACK:
                    self._settings(payload)
            elif ftype == PING:
                if length != 8:
                    raise H2ProtocolError(FRAME_SIZE_ERROR, "PING of wrong size")
                if not flags & ACK:
                    self.write(frame(PING, ACK, 0, payload))
            elif ftype == RST_STREAM:
                st = streams.pop(sid, None)
                if st is not None:
                    self.forget(st)
                    code = _U32.unpack(payload)[0] if length == 4 else PROTOCOL_ERROR
                    self.on_reset(st, code)
                    self.stream_closed(st)
            elif ftype == GOAWAY:
                last, code = _U32X2.unpack_from(payload)
                self.on_goaway(last & MAX_STREAM_ID, code, payload[8:])
            elif ftype == PUSH_PROMISE:
                raise H2ProtocolError(PROTOCOL_ERROR, "push is disabled")
            # PRIORITY and unknown frame types are ignored
            if self.closed:
                return
        self._buf = data[pos:] if pos < n else b""

    def _headers(self, sid: int, block: bytes, flags: int) -> None:
        try:
            headers = self.decoder.decode(block)
        except HpackError as exc:
            raise H2ProtocolError(COMPRESSION_ERROR, str(exc)) from exc
        self.on_headers(sid, headers, bool(flags & END_STREAM))

    def _settings(self, payload: bytes) -> None:
        if len(payload) % 6:
            raise H2ProtocolError(FRAME_SIZE_ERROR, "SETTINGS of wrong size")
        for i in range(0, len(payload), 6):
            ident, value = _SETTING.unpack_from(payload, i)
            if ident == S_INITIAL_WINDOW_SIZE:
                if value > MAX_STREAM_ID:
                    raise H2ProtocolError(FLOW_CONTROL_ERROR, "initial window too large")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for st in self.streams.values():
                    st.send_window += delta
                if delta > 0:
                    for st in list(self.streams.values()):
                        if st.pending:
                            self._drain_stream(st)
            elif ident == S_MAX_FRAME_SIZE:
                if not 16384 <= value <= 16777215:
                    raise H2ProtocolError(PROTOCOL_ERROR, "bad SETTINGS_MAX_FRAME_SIZE")
                self.peer_max_frame = value
            elif ident == S_MAX_CONCURRENT_STREAMS:
                self.peer_max_streams = value
            elif ident == S_HEADER_TABLE_SIZE:
                self._table_update = True
        self.write(frame(SETTINGS, ACK, 0))
        self.on_settings()

    # ------------------------------------------------------------------ hooks

    def on_headers(self, sid: int, headers: Headers, end_stream: bool) -> None:
        raise NotImplementedError

    def on_data(self, st: Stream, data: bytes, end_stream: bool) -> None:
        raise NotImplementedError

    def on_reset(self, st: Stream, code: int) -> None:
        """The peer reset ``st`` (already removed from ``streams``)."""

    def on_goaway(self, last_stream: int, code: int, debug: bytes) -> None:
        """The peer will not process streams above ``last_stream``."""

    def on_settings(self) -> None:
        """The peer's SETTINGS arrived (and were acknowledged)."""

    def stream_closed(self, st: Stream) -> None:
        """``st`` left ``streams`` (both sides ended, or reset)."""

