"""Fuzzing the balancer's HPACK decoder and HTTP/2 frame parser (hypothesis).

Whatever a peer sends, nothing but a protocol error may come out: the decoder raises only
:class:`HpackError`; a connection either carries on or ends with a GOAWAY whose code says what
the peer did (never INTERNAL_ERROR, never an exception that reaches the bug log), within a bounded
time per example. CI runs a few hundred examples in seconds; ``MODELYARD_FUZZ_EXAMPLES=20000``
runs more.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import hpack
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from modelyard.balancer.h2 import connection as h2
from modelyard.balancer.h2.hpack import Decoder, HpackError, encode
from modelyard.balancer.limits import LimitsConfig

EXAMPLES = int(os.environ.get("MODELYARD_FUZZ_EXAMPLES", "0")) or None
#: CI: the same 150 examples on every run; with MODELYARD_FUZZ_EXAMPLES, that many fresh random ones
FUZZ = settings(max_examples=EXAMPLES or 150, derandomize=EXAMPLES is None,
                deadline=timedelta(milliseconds=2000), database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])  # `bugs` is cleared per example

#: codes a connection may end with when the peer misbehaves (INTERNAL_ERROR would be our bug)
PEER_CODES = {h2.NO_ERROR, h2.PROTOCOL_ERROR, h2.FLOW_CONTROL_ERROR, h2.FRAME_SIZE_ERROR, h2.COMPRESSION_ERROR,
              h2.ENHANCE_YOUR_CALM, h2.SETTINGS_TIMEOUT, h2.STREAM_CLOSED}


# ------------------------------------------------------------------ HPACK


@FUZZ
@given(st.binary(max_size=400))
def test_any_bytes_decode_or_raise_hpack_error(block: bytes) -> None:
    try:
        Decoder().decode(block)
    except HpackError:
        pass


names = st.sampled_from([b":path", b":method", b"content-type", b"grpc-timeout", b"x-a", b"x-b", b"user-agent"]) \
    | st.binary(min_size=1, max_size=20)
values = st.binary(max_size=60) | st.sampled_from([b"", b"POST", b"application/grpc", b"1000m"])
header_lists = st.lists(st.tuples(names, values), max_size=8)


@st.composite
def mutated(draw: Any, block: bytes) -> bytes:
    kind = draw(st.sampled_from(["none", "none", "flip", "truncate", "insert"]))
    if not block or kind == "none":
        return block
    i = draw(st.integers(0, len(block) - 1))
    if kind == "flip":
        return block[:i] + bytes([block[i] ^ draw(st.integers(1, 255))]) + block[i + 1:]
    if kind == "truncate":
        return block[:i]
    return block[:i] + draw(st.binary(min_size=1, max_size=8)) + block[i:]


@FUZZ
@given(st.data(), st.lists(st.tuples(header_lists, st.booleans(), st.sampled_from([None, 0, 256, 4096])),
                           min_size=1, max_size=10))
def test_what_a_real_encoder_writes_round_trips_and_its_mutations_raise_only_hpack_error(
        data: Any, blocks: list[tuple[list[tuple[bytes, bytes]], bool, int | None]]) -> None:
    enc, dec = hpack.Encoder(), Decoder()
    for headers, huffman, table_size in blocks:
        if table_size is not None:
            enc.header_table_size = table_size  # the next block starts with a size update
        block = enc.encode(headers, huffman=huffman)
        bad = data.draw(mutated(block))
        if bad == block:
            assert dec.decode(block) == tuple(headers)
            continue
        try:
            dec.decode(bad)
        except HpackError:
            pass  # the connection would end here (COMPRESSION_ERROR)
        return  # decoded or not, the tables are out of step from here on


# ------------------------------------------------------------------ frames


def raw_frame(ftype: int, flags: int, sid: int, payload: bytes, length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    return struct.pack(">BHBBI", n >> 16, n & 0xFFFF, ftype, flags, sid) + payload


REQUEST = encode(((b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/t.T/Unary"),
                  (b"content-type", b"application/grpc"), (b"te", b"trailers")))
RESPONSE = encode(((b":status", b"200"), (b"content-type", b"application/grpc")))
TRAILERS = encode(((b"grpc-status", b"0"),))

any_sids = st.sampled_from([0, 1, 1, 3, 3, 5, 2, 7, 9, 1 << 31 | 1, (1 << 31) - 1]) | st.integers(0, (1 << 32) - 1)
flag_sets = st.sampled_from([0, h2.END_STREAM, h2.END_HEADERS, h2.END_STREAM | h2.END_HEADERS, h2.PADDED,
                             h2.PADDED | h2.END_HEADERS, h2.PRIORITY_FLAG | h2.END_HEADERS, h2.ACK]) \
    | st.integers(0, 255)
settings_payloads = st.lists(st.tuples(st.integers(0, 8), st.sampled_from([0, 1, 2, 100, 16384, 65535, 1 << 20,
                                                                          (1 << 24) - 1, (1 << 31) - 1, 1 << 31,
                                                                          (1 << 32) - 1])),
                             max_size=4).map(lambda kv: b"".join(struct.pack(">HI", k, v) for k, v in kv))
payloads = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([REQUEST, RESPONSE, TRAILERS, b"\x00\x00\x00\x00\x02ok", b"", bytes(8), b"\x20" * 3]),
    settings_payloads,
    st.integers(0, (1 << 32) - 1).map(lambda v: struct.pack(">I", v)),
    st.binary(min_size=1, max_size=4).map(lambda b: b * 1024),  # big frames, some over 16 KiB
)


def padded(draw: Any, flags: int, payload: bytes) -> tuple[int, bytes]:
    """Sometimes PADDED (well-formed) and, for HEADERS, a PRIORITY prefix."""
    if draw(st.booleans()):
        pad = draw(st.integers(0, 20))
        return flags | h2.PADDED, bytes([pad]) + payload + bytes(pad)
    return flags, payload


@st.composite
def frames(draw: Any, sids: list[int]) -> bytes:
    """One frame: mostly what a peer would send on the streams of the conversation, sometimes anything."""
    kind = draw(st.sampled_from(["open"] * 3 + ["data"] * 3 + ["end", "reset", "window", "window", "settings", "ping",
                                                               "priority", "goaway", "continuation", "random"]))
    if not sids and draw(st.integers(0, 9)):
        kind = "open"  # most conversations start with a stream
    sid = draw(st.sampled_from(sids)) if sids else 1
    if kind == "open":  # the next client stream (a server's answer on an upstream connection)
        sid = sids[-1] + 2 if sids and draw(st.booleans()) else sid
        sids.append(sid)
        block = draw(st.sampled_from([REQUEST, RESPONSE, TRAILERS]) | st.binary(max_size=30))
        flags, payload = padded(draw, h2.END_HEADERS | draw(st.sampled_from([0, h2.END_STREAM])), block)
        if draw(st.booleans()):
            flags |= h2.PRIORITY_FLAG
            payload = (payload[:1] + bytes(5) + payload[1:]) if flags & h2.PADDED else bytes(5) + payload
        if draw(st.integers(0, 4)) == 0:  # split across CONTINUATIONs
            cut = len(payload) // 2
            return raw_frame(h2.HEADERS, flags & ~h2.END_HEADERS, sid, payload[:cut]) + \
                raw_frame(h2.CONTINUATION, h2.END_HEADERS, sid, payload[cut:])
        return raw_frame(h2.HEADERS, flags, sid, payload)
    if kind in ("data", "end"):
        body = draw(st.sampled_from([b"\x00\x00\x00\x00\x02ok", b""]) | st.binary(max_size=64)
                    | st.integers(1, 16).map(lambda k: bytes(1024 * k)))
        flags, payload = padded(draw, h2.END_STREAM if kind == "end" else 0, body)
        return raw_frame(h2.DATA, flags, sid, payload) * draw(st.integers(1, 3))
    if kind == "reset":
        return raw_frame(h2.RST_STREAM, 0, sid, struct.pack(">I", draw(st.sampled_from([0, 1, 8]))))
    if kind == "window":
        inc = draw(st.sampled_from([1, 1000, 1 << 20, (1 << 31) - 1, 0]))
        return raw_frame(h2.WINDOW_UPDATE, 0, draw(st.sampled_from([0, sid])), struct.pack(">I", inc))
    if kind == "settings":
        return raw_frame(h2.SETTINGS, draw(st.sampled_from([0, 0, h2.ACK])), 0, draw(settings_payloads))
    if kind == "ping":
        return raw_frame(h2.PING, draw(st.sampled_from([0, h2.ACK])), 0, bytes(8)) * draw(st.integers(1, 40))
    if kind == "priority":
        return raw_frame(h2.PRIORITY, 0, sid, bytes(5))
    if kind == "goaway":
        return raw_frame(h2.GOAWAY, 0, 0, struct.pack(">II", draw(st.integers(0, 9)), 0))
    if kind == "continuation":
        return raw_frame(h2.CONTINUATION, draw(st.sampled_from([0, h2.END_HEADERS])), sid, draw(st.binary(max_size=8)))
    ftype = draw(st.sampled_from(range(10)) | st.integers(10, 255))
    length = draw(st.sampled_from([None] * 9 + [0, 3, 20000]))  # sometimes a length that lies
    return raw_frame(ftype, draw(flag_sets), draw(any_sids), draw(payloads), length)


@st.composite
def conversations(draw: Any) -> list[bytes]:
    """Frames (after a good or broken start), cut into the reads the balancer would get."""
    start = draw(st.sampled_from([h2.settings_frame({})] * 4 + [h2.settings_frame({h2.S_INITIAL_WINDOW_SIZE: 0}),
                                  h2.settings_frame({h2.S_MAX_FRAME_SIZE: 1 << 20}), b""]))
    sids: list[int] = []
    body = start + b"".join(draw(frames(sids)) for _ in range(draw(st.integers(1, 25))))
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
    return [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True) if b > a]


class FakeTransport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written += data

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.closing = True

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


class EchoCall:
    """A call that answers at once and echoes its request bytes (credit, windows and queues all move)."""

    def __init__(self, st_: h2.Stream) -> None:
        self.st = st_
        self.start = 0.0
        conn = st_.conn
        conn.send_headers(st_, RESPONSE, False)

    def on_headers(self, headers: Any, end: bool) -> None:
        self.on_data(b"", end)

    def on_data(self, data: bytes, end: bool) -> None:
        conn = self.st.conn
        conn.consumed(self.st, len(data))
        conn.send_data(self.st, data, False)
        if end:
            conn.send_headers(self.st, TRAILERS, True)

    def on_failed(self, reason: str) -> None:
        pass


class FakeProxy:
    def __init__(self) -> None:
        self.limits = LimitsConfig(max_concurrent_streams=8, reset_limit=5, frames_per_read=16, preface_timeout=30)
        self.flusher = h2.Flusher()
        self.connections: set[Any] = set()
        self.draining_connections = False
        self.clock = type("Clock", (), {"now": staticmethod(lambda: 0.0)})()

    def new_call(self, st_: h2.Stream, headers: Any, end: bool) -> None:
        event("a call")
        st_.handler = call = EchoCall(st_)
        if end:
            call.on_data(b"", True)


def run_conversation(make: Callable[[], h2.H2Connection], chunks: list[bytes], bugs: list[BaseException]) -> None:
    transport = FakeTransport()

    async def go() -> None:
        conn = make()
        conn.connection_made(transport)  # type: ignore[arg-type]
        for c in chunks:
            conn.data_received(c)
            for _ in range(50):  # turns left for later
                if not conn._backlog:
                    break
                await asyncio.sleep(0)
        if isinstance(conn, UpstreamLike):
            conn.connection_lost(None)  # type: ignore[attr-defined]

    asyncio.run(go())
    assert not bugs, bugs
    out = bytes(transport.written)
    out = out[len(h2.PREFACE):] if out.startswith(h2.PREFACE) else out  # an upstream connection's
    goaways = []
    while len(out) >= 9:
        n = int.from_bytes(out[:3], "big")
        if out[3] == h2.GOAWAY:
            goaways.append(int.from_bytes(out[13:17], "big"))
        out = out[9 + n:]
    assert not out or len(out) < 9
    assert set(goaways) <= PEER_CODES, goaways
    event(f"GOAWAY {goaways[0]}" if goaways else "no GOAWAY")  # see --hypothesis-show-statistics


@pytest.fixture
def bugs(monkeypatch: pytest.MonkeyPatch) -> list[BaseException]:
    """Exceptions that would have been logged as bugs (anything but a protocol error)."""
    import sys

    found: list[BaseException] = []
    monkeypatch.setattr(h2, "_log_bug", lambda: found.append(sys.exc_info()[1]))  # type: ignore[arg-type]
    return found


@FUZZ
@given(conversations(), st.integers(0, 9).map(bool))
def test_a_client_connection_survives_any_frames_or_ends_with_a_protocol_goaway(
        bugs: list[BaseException], chunks: list[bytes], preface: bool) -> None:
    from modelyard.balancer.downstream import DownstreamConnection

    bugs.clear()
    run_conversation(lambda: DownstreamConnection(FakeProxy()),  # type: ignore[arg-type]
                     [h2.PREFACE, *chunks] if preface else chunks, bugs)


class UpstreamLike:
    """Marker: conversations end with connection_lost (the upstream fails its streams)."""


@FUZZ
@given(conversations(), st.integers(0, 4))
def test_an_upstream_connection_survives_any_frames_or_ends_with_a_protocol_goaway(
        bugs: list[BaseException], chunks: list[bytes], streams: int) -> None:
    from modelyard.balancer.upstream import UpstreamConnection

    class Up:
        address, connect_timeout, flusher = "127.0.0.1:1", 30.0, h2.Flusher()

        def forget(self, c: Any) -> None: ...

        def connect_failed(self, c: Any, reason: str) -> None: ...

        def connect_succeeded(self) -> None: ...

    class Handler:
        def on_headers(self, headers: Any, end: bool) -> None: ...

        def on_data(self, data: bytes, end: bool) -> None: ...

        def on_failed(self, reason: str) -> None: ...

    class Conn(UpstreamConnection, UpstreamLike):
        pass

    def make() -> Conn:
        conn = Conn(Up())  # type: ignore[arg-type]
        for _ in range(streams):
            s = conn.open_stream(Handler())
            conn.send_headers(s, REQUEST, False)
            conn.send_data(s, b"\x00" * 70000, True)  # over the default window: queued
        return conn

    bugs.clear()
    run_conversation(make, chunks, bugs)
