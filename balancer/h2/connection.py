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

Against a hostile peer (client connections are ``guarded``; see :mod:`modelyard.balancer.limits`):
every frame is validated as RFC 9113 says, and a violation is a protocol error (GOAWAY with its
code, logged without a traceback); our receive windows are enforced (FLOW_CONTROL_ERROR); a client
connection's window is given back as its bytes leave, so it bounds what the connection holds;
control frames queued for a peer that does not read them are bounded (ENHANCE_YOUR_CALM), reading
stops while the write buffer is over its high-water mark, and at most ``frames_per_read`` frames are
processed before other connections get a turn; header blocks are bounded in bytes and
CONTINUATION frames, consecutive empty frames in number.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections import deque
from typing import Any, Protocol

from modelyard.balancer.h2.hpack import MAX_HEADER_LIST, Decoder, Headers, HpackError
from modelyard.balancer.limits import DEFAULT_LIMITS, LimitsConfig

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
ENHANCE_YOUR_CALM = 11

S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS = 1, 2, 3
S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = 4, 5, 6

DEFAULT_WINDOW = 65535
#: what we advertise: per-stream receive window, connection receive window, frame size
STREAM_WINDOW = 1 << 20
CONN_WINDOW = 1 << 24
MAX_FRAME = 16384
MAX_STREAM_ID = (1 << 31) - 1
#: a header block's wire bytes may exceed its decoded size by at most two table size updates
_BLOCK_SLACK = 16
#: seconds a connection closed for an error may take to flush its GOAWAY before it is aborted
CLOSE_GRACE = 3.0
_UNLIMITED = 1 << 62
#: the SETTINGS and WINDOW_UPDATE that open a connection, per (settings, window): built once
_OPEN_FRAMES: dict[tuple[tuple[tuple[int, int], ...], int], bytes] = {}

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


_bug_log = {"next": 0.0, "suppressed": 0}


def _log_bug() -> None:
    """A traceback for an unexpected exception, at most one every 10 s (a peer must not flood the log)."""
    now = time.monotonic()
    if now < _bug_log["next"]:
        _bug_log["suppressed"] += 1
        return
    n = int(_bug_log["suppressed"])
    _bug_log.update(next=now + 10.0, suppressed=0)
    log.exception("HTTP/2 connection error" + (f" ({n} more in the last 10 s, not shown)" if n else ""))


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

    __slots__ = ("conn", "handler", "id", "local_closed", "pending", "recv_held", "recv_unacked", "recv_window",
                 "remote_closed", "send_window", "source")

    def __init__(self, sid: int, conn: H2Connection) -> None:
        self.id = sid
        self.conn = conn
        self.handler: StreamHandler | None = None
        self.source: Stream | None = None
        self.send_window = conn.peer_initial_window
        #: frames waiting for send window: (is_headers, payload, end_stream)
        self.pending: deque[tuple[bool, bytes, bool]] | None = None
        #: the peer's window on this stream as we granted it, and bytes received not yet given back
        self.recv_window = conn.stream_window
        self.recv_unacked = 0
        #: bytes received whose connection-window credit is owed (client connections: given back as they leave)
        self.recv_held = 0
        self.local_closed = False
        self.remote_closed = False

    def __repr__(self) -> str:
        return f"Stream({self.id})"


class H2Connection(asyncio.Protocol):
    """Frame parsing, settings, pings, windows and the send queue; subclasses handle streams."""

    last_peer_stream: int
    #: SETTINGS we send right after the preface (subclasses may extend; windows and the header list
    #: size come from the connection's limits)
    local_settings: dict[int, int] = {S_INITIAL_WINDOW_SIZE: STREAM_WINDOW, S_MAX_FRAME_SIZE: MAX_FRAME,
                                      S_MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST}
    #: the connection receive window is given back as soon as DATA arrives (upstreams: one slow client
    #: must not stall a connection every client shares), else as the bytes leave (client connections:
    #: the window then bounds what the connection holds)
    credit_on_receipt = True
    #: defended against its peer (client connections): reading pauses while the write buffer is over
    #: its high-water mark, at most ``frames_per_read`` frames per turn, queued control frames bounded
    guarded = False

    def __init__(self, flusher: Flusher, limits: LimitsConfig | None = None) -> None:
        lim = limits if limits is not None else DEFAULT_LIMITS
        self.limits = lim
        self.flusher = flusher
        self.transport: Any = None
        self._buf = b""
        #: where unprocessed frames start in ``_buf`` (a turn ended before they were processed)
        self._bpos = 0
        self._wbuf: list[bytes] = []
        self.decoder = Decoder(max_list=lim.max_header_list_bytes, cache_bytes=lim.connection_header_cache_bytes)
        self.streams: dict[int, Stream] = {}
        self.peer_max_frame = MAX_FRAME
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_streams = MAX_STREAM_ID
        self.send_window = DEFAULT_WINDOW
        #: our receive windows: per stream (SETTINGS_INITIAL_WINDOW_SIZE) and the connection's
        self.stream_window = lim.stream_buffer_bytes
        self.conn_window = lim.connection_buffer_bytes
        self.local_settings = {**type(self).local_settings, S_INITIAL_WINDOW_SIZE: self.stream_window,
                               S_MAX_HEADER_LIST_SIZE: lim.max_header_list_bytes}
        #: the peer's connection window as we granted it, and credit not yet sent
        self.recv_window = self.conn_window
        self.recv_unacked = 0
        self._conn_threshold = self.conn_window // 4
        self._stream_threshold = self.stream_window // 4
        #: the header block being received (HEADERS without END_HEADERS, then CONTINUATIONs)
        self._cont: bytearray | None = None
        self._cont_sid = 0
        self._cont_flags = 0
        self._cont_frames = 0
        self._max_block = lim.max_header_list_bytes + _BLOCK_SLACK
        self._max_cont = lim.max_continuation_frames
        self._max_empty = lim.max_empty_frames
        self._empty = 0
        #: the first frame from the peer must be SETTINGS (RFC 9113 3.4); and it acknowledged ours
        self._need_settings = True
        self.settings_acked = False
        guarded = self.guarded
        self.frames_per_read = lim.frames_per_read if guarded else _UNLIMITED
        self.max_control = lim.max_control_frames if guarded else _UNLIMITED
        #: control frames (PING/SETTINGS ACKs, RST_STREAM) written since the write buffer was last empty
        self._ctl = 0
        #: request bytes kept for retries by this connection's calls, at most ``conn_window``
        #: (limits.connection_buffer_bytes); beyond it a call is sent once (kept by balancer.call.Call)
        self.retry_held = 0
        self._blocked: dict[Stream, None] = {}
        self.closed = False
        #: the transport's write buffer is over its high-water mark: hold DATA (and so the
        #: window credit of the streams it comes from) until it drains
        self.paused = False
        self._reading = True
        #: frames are waiting in ``_buf`` for the next turn, which is scheduled
        self._backlog = False
        self._turn_scheduled = False
        self.goaway_sent = False
        self.last_peer_stream: int = 0
        #: our next header block starts with a dynamic-table size update to 0 (we never index, and
        #: RFC 7541 4.2 wants the update after the peer changes SETTINGS_HEADER_TABLE_SIZE)
        self._table_update = True

    def _open_frames(self) -> bytes:
        key = (tuple(self.local_settings.items()), self.conn_window)
        out = _OPEN_FRAMES.get(key)
        if out is None:
            out = settings_frame(self.local_settings)
            if self.conn_window > DEFAULT_WINDOW:
                out += window_update(0, self.conn_window - DEFAULT_WINDOW)
            _OPEN_FRAMES[key] = out
        if self.conn_window <= DEFAULT_WINDOW:
            self.recv_window = DEFAULT_WINDOW
        return out

    # ------------------------------------------------------------------ writing

    def write(self, data: bytes) -> None:
        if not self._wbuf:
            self.flusher.mark(self)
        self._wbuf.append(data)

    def flush(self) -> None:
        if not self._wbuf or self.transport is None:
            return  # still connecting: connection_made flushes
        ctl = self._ctl
        if ctl and ctl > self.max_control and not self.closed:
            self._fail_connection(ENHANCE_YOUR_CALM, f"over {self.max_control} control frames queued")
            return
        if not self.closed:
            self.transport.write(b"".join(self._wbuf) if len(self._wbuf) > 1 else self._wbuf[0])
            if ctl and not self.transport.get_write_buffer_size():
                self._ctl = 0  # the peer reads: nothing is queued
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
        if self.guarded:
            self._set_reading()  # a peer that does not read gets nothing more read from it either

    def resume_writing(self) -> None:
        self.paused = False
        if self._blocked:
            self._unblock()
        if self.guarded:
            if self._backlog:
                self._schedule_turn()
            self._set_reading()

    def _set_reading(self) -> None:
        """Read from the transport unless its write buffer is full, frames wait for a turn, or it closed."""
        if self.closed:
            return  # closing: reading (and dropping) until the peer closes, see _fail_connection
        want = not (self.paused or self._backlog)
        if want != self._reading and self.transport is not None:
            self._reading = want
            try:
                if want:
                    self.transport.resume_reading()
                else:
                    self.transport.pause_reading()
            except (AttributeError, RuntimeError):  # a closing transport
                pass

    def _schedule_turn(self) -> None:
        if not self._turn_scheduled:
            self._turn_scheduled = True
            asyncio.get_running_loop().call_soon(self._next_turn)

    def _next_turn(self) -> None:
        """Process the frames left from an earlier turn (other connections had theirs in between)."""
        self._turn_scheduled = False
        if self.closed or self.paused:
            return  # resume_writing schedules the next turn
        self._backlog = False
        self.data_received(b"")
        self._set_reading()

    def _start_transport(self, transport: Any) -> None:
        self.transport = transport
        # a deeper buffer than asyncio's 64 KiB default: pausing is for slow readers, not bursts
        transport.set_write_buffer_limits(high=1 << 20)

    def consumed(self, st: Stream, n: int) -> None:
        """``n`` bytes received on ``st`` were forwarded (or kept for a retry): give the peer that much window back."""
        if self.closed:
            return
        held = st.recv_held
        if held:  # client connections: the connection window comes back as bytes leave (_credit, inlined)
            if n < held:
                st.recv_held = held - n
                u = self.recv_unacked + n
            else:
                st.recv_held = 0
                u = self.recv_unacked + held
            if u >= self._conn_threshold:
                self.recv_window += u
                self.write(window_update(0, u))
                u = 0
            self.recv_unacked = u
        if st.remote_closed:
            return
        u = st.recv_unacked + n
        if u >= self._stream_threshold:
            st.recv_window += u
            self.write(window_update(st.id, u))
            u = 0
        st.recv_unacked = u

    def _credit(self, n: int) -> None:
        """Give ``n`` bytes of connection window back (in updates of at least a quarter window)."""
        u = self.recv_unacked + n
        if u >= self._conn_threshold:
            self.recv_window += u
            self.write(window_update(0, u))
            u = 0
        self.recv_unacked = u

    def _release(self, st: Stream) -> None:
        """``st`` is gone: the connection window its unforwarded bytes held comes back."""
        held = st.recv_held
        if held:
            st.recv_held = 0
            if not self.closed:
                self._credit(held)

    def forget(self, st: Stream) -> None:
        """``st`` is over: drop what it still had queued (it must never reach the wire)."""
        st.local_closed = st.remote_closed = True
        st.pending = None
        self._blocked.pop(st, None)
        if st.recv_held:
            self._release(st)

    def reset(self, st: Stream, code: int) -> None:
        """RST_STREAM ``st`` and forget it."""
        if self.streams.pop(st.id, None) is None and st.local_closed and st.remote_closed:
            return
        self.forget(st)
        if not self.closed:
            self.write(frame(RST_STREAM, 0, st.id, _U32.pack(code)))
            self._ctl += 1
        self.stream_closed(st)

    def _stream_error(self, st: Stream, code: int, reason: str) -> None:
        """The peer broke the rules on ``st`` only: RST_STREAM with ``code``; its handler learns why."""
        handler = st.handler
        self.reset(st, code)
        if handler is not None:
            handler.on_failed(reason)
        self.on_stream_error(st)

    def _local_close(self, st: Stream) -> None:
        st.local_closed = True
        if st.remote_closed:
            if self.streams.pop(st.id, None) is not None:
                self._blocked.pop(st, None)
                if st.recv_held:
                    self._release(st)
                self.stream_closed(st)
        elif st.handler is None and self.guarded and st.id in self.streams:
            # answered, and its call is over: the client may stop sending (RFC 9113 8.1)
            self.reset(st, NO_ERROR)

    def _remote_close(self, st: Stream) -> None:
        st.remote_closed = True
        if st.local_closed and self.streams.pop(st.id, None) is not None:
            self._blocked.pop(st, None)
            if st.recv_held:
                self._release(st)
            self.stream_closed(st)

    def send_goaway(self, code: int = NO_ERROR, message: str = "") -> None:
        self.goaway_sent = True
        self.write(frame(GOAWAY, 0, 0, _U32X2.pack(self.last_peer_stream, code) + message.encode()[:200]))

    def close(self) -> None:
        self.flush()
        if self.transport is not None:
            self.transport.close()

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # ------------------------------------------------------------------ reading

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        fl = self.flusher
        fl.depth += 1
        try:
            self._receive(data)
        except H2ProtocolError as exc:  # the peer's fault: no traceback
            log.debug("HTTP/2 peer error (code %d): %s", exc.code, exc)
            self._fail_connection(exc.code, str(exc))
        except Exception:  # a bug must cost one connection, never the process
            _log_bug()
            self._fail_connection(INTERNAL_ERROR, "internal error")
        finally:
            fl.depth -= 1
            if not fl.depth:
                fl.run()

    def _fail_connection(self, code: int, message: str) -> None:
        if self.closed:
            return
        self._ctl = 0
        if code == ENHANCE_YOUR_CALM:
            self._wbuf.clear()  # what a flood queued goes nowhere
        self.send_goaway(code, message)
        self.flush()
        self.closed = True
        self.on_connection_failed(message)
        t = self.transport
        if t is None:
            return
        # a lingering close: FIN once the GOAWAY is written, while what the peer still sends is read
        # and dropped (closing a socket with unread input resets it, and the GOAWAY is lost); a peer
        # that does not close within CLOSE_GRACE, or does not read, is aborted
        if t.can_write_eof():
            t.write_eof()
            if not self._reading:
                self._reading = True
                t.resume_reading()
        else:
            t.close()
        asyncio.get_running_loop().call_later(CLOSE_GRACE, self._abort)

    def _receive(self, data: bytes) -> None:
        buf = self._buf
        if buf:
            pos = self._bpos
            if data:
                data = (buf[pos:] if pos else buf) + data
                pos = 0
            else:
                data = buf
            self._buf = b""
            self._bpos = 0
        else:
            pos = 0
        n = len(data)
        if self._need_settings and n - pos >= 9:
            if data[pos + 3] != SETTINGS or data[pos + 4] & ACK:
                raise H2ProtocolError(PROTOCOL_ERROR, "the first frame must be SETTINGS")
            self._need_settings = False
        unpack = _HDR.unpack_from
        streams = self.streams
        turn = self.frames_per_read
        while n - pos >= 9:
            turn -= 1
            if turn < 0:  # the rest waits for a turn: other connections go first
                self._buf = data
                self._bpos = pos
                self._backlog = True
                self._set_reading()
                self._schedule_turn()
                return
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
                w = self.recv_window - length
                if w < 0:
                    raise H2ProtocolError(FLOW_CONTROL_ERROR, f"DATA of {length} bytes over the connection "
                                                              f"window ({self.recv_window})")
                receipt = self.credit_on_receipt
                if receipt:  # _credit, inlined: every DATA frame of an upstream
                    u = self.recv_unacked + length
                    if u >= self._conn_threshold:
                        w += u
                        self.write(window_update(0, u))
                        u = 0
                    self.recv_unacked = u
                self.recv_window = w
                st = streams.get(sid)
                if st is None or st.remote_closed:
                    self._data_not_expected(sid, st, length)
                    continue
                w = st.recv_window - length
                if w < 0:
                    if not receipt:
                        self._credit(length)
                    self._stream_error(st, FLOW_CONTROL_ERROR, f"DATA of {length} bytes over the stream window "
                                                               f"({st.recv_window})")
                    continue
                st.recv_window = w
                if not receipt:
                    st.recv_held += length
                if flags & PADDED:
                    if not payload or payload[0] >= length:
                        raise H2ProtocolError(PROTOCOL_ERROR, "padding longer than the frame")
                    payload = payload[1:len(payload) - payload[0]]
                    self.consumed(st, length - len(payload))  # padding is never forwarded: give it back now
                if not payload:
                    if not flags & END_STREAM:
                        self._empty_frame()
                elif self._empty:
                    self._empty = 0
                if flags & END_STREAM:
                    st.remote_closed = True
                    self.on_data(st, payload, True)
                    self._remote_close(st)
                else:
                    self.on_data(st, payload, False)
            elif ftype == HEADERS:  # stream 0: on_headers refuses it
                if flags & PADDED:
                    if not payload or payload[0] >= length:
                        raise H2ProtocolError(PROTOCOL_ERROR, "padding longer than the frame")
                    payload = payload[1:len(payload) - payload[0]]
                if flags & PRIORITY_FLAG:
                    if len(payload) < 5:
                        raise H2ProtocolError(FRAME_SIZE_ERROR, "HEADERS too short for its priority fields")
                    payload = payload[5:]
                if not payload:
                    if not flags & END_STREAM:
                        self._empty_frame()
                elif self._empty:
                    self._empty = 0
                if not flags & END_HEADERS:
                    self._cont = bytearray(payload)
                    self._cont_sid = sid
                    self._cont_flags = flags
                    self._cont_frames = 0
                    continue
                self._headers(sid, payload, flags)
            elif ftype == CONTINUATION:
                cont = self._cont
                if cont is None or self._cont_sid != sid:
                    raise H2ProtocolError(PROTOCOL_ERROR, "unexpected CONTINUATION")
                self._cont_frames += 1
                if self._cont_frames > self._max_cont:
                    raise H2ProtocolError(ENHANCE_YOUR_CALM, f"over {self._max_cont} CONTINUATION frames")
                if payload:
                    self._empty = 0
                    cont += payload
                    if len(cont) > self._max_block:
                        raise H2ProtocolError(ENHANCE_YOUR_CALM, f"header block over {self._max_block} bytes")
                else:
                    self._empty_frame()
                if flags & END_HEADERS:
                    self._cont = None
                    self._headers(sid, bytes(cont), self._cont_flags)
            elif ftype == WINDOW_UPDATE:
                if length != 4:
                    raise H2ProtocolError(FRAME_SIZE_ERROR, "WINDOW_UPDATE of wrong size")
                inc = _U32.unpack(payload)[0] & MAX_STREAM_ID
                if sid == 0:
                    if not inc:
                        raise H2ProtocolError(PROTOCOL_ERROR, "connection WINDOW_UPDATE of 0")
                    self.send_window += inc
                    if self.send_window > MAX_STREAM_ID:
                        raise H2ProtocolError(FLOW_CONTROL_ERROR, "connection send window over 2^31-1")
                    if self._blocked:
                        self._unblock()
                else:
                    st = streams.get(sid)
                    if st is None:
                        if self._idle(sid):
                            raise H2ProtocolError(PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
                    elif not inc:
                        self._stream_error(st, PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
                    else:
                        st.send_window += inc
                        if st.send_window > MAX_STREAM_ID:
                            self._stream_error(st, FLOW_CONTROL_ERROR, "stream send window over 2^31-1")
                        elif st.pending:
                            self._drain_stream(st)
            elif ftype == SETTINGS:
                if sid:
                    raise H2ProtocolError(PROTOCOL_ERROR, "SETTINGS on a stream")
                if flags & ACK:
                    if length:
                        raise H2ProtocolError(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
                    self.settings_acked = True
                else:
                    self._settings(payload)
            elif ftype == PING:
                if sid:
                    raise H2ProtocolError(PROTOCOL_ERROR, "PING on a stream")
                if length != 8:
                    raise H2ProtocolError(FRAME_SIZE_ERROR, "PING of wrong size")
                if not flags & ACK:
                    self.write(frame(PING, ACK, 0, payload))
                    self._ctl += 1
                    if self._ctl > self.max_control:
                        raise H2ProtocolError(ENHANCE_YOUR_CALM, f"over {self.max_control} control frames queued")
            elif ftype == RST_STREAM:
                if length != 4:
                    raise H2ProtocolError(FRAME_SIZE_ERROR, "RST_STREAM of wrong size")
                if not sid:
                    raise H2ProtocolError(PROTOCOL_ERROR, "RST_STREAM on stream 0")
                st = streams.pop(sid, None)
                if st is not None:
                    self.forget(st)
                    self.on_reset(st, _U32.unpack(payload)[0])
                    self.stream_closed(st)
                elif self._idle(sid):
                    raise H2ProtocolError(PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
            elif ftype == GOAWAY:
                if sid:
                    raise H2ProtocolError(PROTOCOL_ERROR, "GOAWAY on a stream")
                if length < 8:
                    raise H2ProtocolError(FRAME_SIZE_ERROR, "GOAWAY shorter than 8 bytes")
                last, code = _U32X2.unpack_from(payload)
                self.on_goaway(last & MAX_STREAM_ID, code, payload[8:])
            elif ftype == PRIORITY:
                if not sid:
                    raise H2ProtocolError(PROTOCOL_ERROR, "PRIORITY on stream 0")
                if length != 5:
                    raise H2ProtocolError(FRAME_SIZE_ERROR, "PRIORITY of wrong size")
            elif ftype == PUSH_PROMISE:
                raise H2ProtocolError(PROTOCOL_ERROR, "push is disabled")
            # unknown frame types are ignored
            if self.closed:
                return
        self._buf = data[pos:] if pos < n else b""

    def _data_not_expected(self, sid: int, st: Stream | None, length: int) -> None:
        """DATA on a stream that is not open for it: the connection window still counts it."""
        if not sid:
            raise H2ProtocolError(PROTOCOL_ERROR, "DATA on stream 0")
        if not self.credit_on_receipt:
            self._credit(length)
        if st is not None:  # half-closed (remote): the peer already ended it
            self._stream_error(st, STREAM_CLOSED, "DATA after the end of the stream")
        elif self._idle(sid):
            raise H2ProtocolError(PROTOCOL_ERROR, f"DATA on idle stream {sid}")
        # else: a stream already closed or reset (its frames may still be in flight)

    def _empty_frame(self) -> None:
        self._empty += 1
        if self._empty > self._max_empty:
            raise H2ProtocolError(ENHANCE_YOUR_CALM, f"over {self._max_empty} consecutive empty frames")

    def _idle(self, sid: int) -> bool:
        """``sid`` was never opened (RFC 9113 5.1): frames other than HEADERS/PRIORITY on it are errors."""
        return False

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
                    if st.send_window > MAX_STREAM_ID:
                        raise H2ProtocolError(FLOW_CONTROL_ERROR, "a stream send window over 2^31-1")
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
            elif ident == S_ENABLE_PUSH and value > 1:
                raise H2ProtocolError(PROTOCOL_ERROR, "bad SETTINGS_ENABLE_PUSH")
        self.write(frame(SETTINGS, ACK, 0))
        self._ctl += 1
        if self._ctl > self.max_control:
            raise H2ProtocolError(ENHANCE_YOUR_CALM, f"over {self.max_control} control frames queued")
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

    def on_connection_failed(self, reason: str) -> None:
        """We sent GOAWAY for an error and close: the streams still open will carry nothing more."""

    def on_stream_error(self, st: Stream) -> None:
        """We reset ``st`` for the peer's error on it (already removed from ``streams``)."""

    def stream_closed(self, st: Stream) -> None:
        """``st`` left ``streams`` (both sides ended, or reset)."""

