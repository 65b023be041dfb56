"""HPACK decoding/encoding and HTTP/2 flow control of the balancer's data plane, without sockets."""

from __future__ import annotations

import asyncio

import hpack
import pytest

from modelyard.balancer.h2 import connection as h2
from modelyard.balancer.h2.hpack import Decoder, HpackError, encode

REQUEST = [(":method", "POST"), (":scheme", "http"), (":path", "/inference.GRPCInferenceService/ModelInfer"),
           (":authority", "127.0.0.1:8001"), ("content-type", "application/grpc"), ("te", "trailers"),
           ("user-agent", "grpc-python/1.78 grpc-c/50.0.0 (linux; chttp2)"), ("x-tenant", "blue")]


def as_bytes(headers: list[tuple[str, str]]) -> tuple[tuple[bytes, bytes], ...]:
    return tuple((k.encode(), v.encode()) for k, v in headers)


def test_decodes_what_a_real_encoder_writes_across_dynamic_table_and_huffman() -> None:
    enc, dec = hpack.Encoder(), Decoder()
    for i in range(50):  # later blocks are mostly dynamic-table references
        headers = [*REQUEST, ("grpc-timeout", f"{1000 + i}m")]
        assert dec.decode(enc.encode(headers, huffman=True)) == as_bytes(headers)


def test_block_cache_is_invalidated_when_the_table_changes() -> None:
    enc, dec = hpack.Encoder(), Decoder()
    dec.decode(enc.encode([("x-a", "one")]))  # inserted at index 62
    ref = enc.encode([("x-a", "one")])  # now a one-byte reference to index 62
    assert ref == b"\xbe"
    assert dec.decode(ref) == ((b"x-a", b"one"),)
    # a different header lands at 62: the same bytes now mean something else
    dec.decode(enc.encode([("x-b", "two")]))
    assert enc.encode([("x-b", "two")]) == b"\xbe"
    assert dec.decode(b"\xbe") == ((b"x-b", b"two"),)


def test_table_size_update_evicts_and_is_bounded_by_what_we_advertised() -> None:
    dec = Decoder(max_table_size=4096)
    dec.decode(hpack.Encoder().encode([("x-a", "1")]))
    assert len(dec.dynamic) == 1
    dec.decode(b"\x20")  # size update to 0
    assert len(dec.dynamic) == 0
    with pytest.raises(HpackError):
        Decoder(max_table_size=100).decode(b"\x3f\xe1\x1f")  # size update to 4096 > 100


@pytest.mark.parametrize("block", [b"\xff\xff\xff\xff\xff\xff", b"\xc0", b"\x40\x85abc", b"\x00\x7f"])
def test_garbage_blocks_raise_hpack_error(block: bytes) -> None:
    with pytest.raises(HpackError):
        Decoder().decode(block)


def test_our_encoding_round_trips_through_a_real_decoder() -> None:
    headers = as_bytes([*REQUEST, ("grpc-status", "0"), ("x-bin", "\u00e9t\u00e9")])
    assert [(k.encode() if isinstance(k, str) else k, v.encode() if isinstance(v, str) else v)
            for k, v in hpack.Decoder().decode(encode(headers), raw=True)] == list(headers)


class Recorder(h2.H2Connection):
    """A connection without a socket: records what it would write."""

    def __init__(self) -> None:
        super().__init__(h2.Flusher())
        self.sent: list[bytes] = []
        self._need_settings = False  # as if the peer's preface SETTINGS had arrived

    def write(self, data: bytes) -> None:
        self.sent.append(data)

    def frames(self) -> list[tuple[int, int, int, bytes]]:
        out, raw = [], b"".join(self.sent)
        while raw:
            n = int.from_bytes(raw[:3], "big")
            out.append((raw[3], raw[4], int.from_bytes(raw[5:9], "big"), raw[9:9 + n]))
            raw = raw[9 + n:]
        self.sent.clear()
        return out


def relay_pair() -> tuple[Recorder, Recorder]:
    """Stream 1 on ``dst`` forwards the bytes of stream 1 on ``src``; ``dst`` has plenty of send window."""
    src_conn, dst_conn = Recorder(), Recorder()
    src, dst = h2.Stream(1, src_conn), h2.Stream(1, dst_conn)
    src_conn.streams[1], dst_conn.streams[1] = src, dst
    dst.source = src
    dst.send_window = dst_conn.send_window = 1 << 24
    return src_conn, dst_conn


def test_data_waits_for_window_and_is_released_by_window_update_in_order() -> None:
    conn = Recorder()
    st = h2.Stream(1, conn)
    conn.streams[1] = st
    conn.send_data(st, b"a" * 70000, False)  # over the peer's default 65535 windows
    conn.send_headers(st, b"\x88", True)  # trailers must wait behind the data
    sent = conn.frames()
    assert sum(len(p) for t, _, _, p in sent if t == h2.DATA) == 65535
    assert all(len(p) <= 16384 for _, _, _, p in sent)
    assert not any(t == h2.HEADERS for t, _, _, _ in sent)
    conn._receive(h2.window_update(0, 10000) + h2.window_update(1, 10000))
    rest = conn.frames()
    assert [t for t, _, _, _ in rest] == [h2.DATA, h2.HEADERS]
    assert len(rest[0][3]) == 70000 - 65535
    assert rest[1][1] & h2.END_STREAM


def test_forwarded_bytes_give_window_back_to_their_source_stream() -> None:
    src_conn, dst_conn = relay_pair()
    dst = dst_conn.streams[1]
    for _ in range(20):
        dst_conn.send_data(dst, b"x" * 16384, False)
    updates = [f for f in src_conn.frames() if f[0] == h2.WINDOW_UPDATE]
    assert updates, "no WINDOW_UPDATE sent to the source after forwarding"
    assert sum(int.from_bytes(p, "big") for _, _, _, p in updates) <= 16384 * 20


def test_settings_change_initial_window_of_open_streams_and_are_acked() -> None:
    conn = Recorder()
    st = h2.Stream(1, conn)
    conn.streams[1] = st
    conn._receive(h2.settings_frame({h2.S_INITIAL_WINDOW_SIZE: 1 << 20, h2.S_MAX_FRAME_SIZE: 1 << 15}))
    assert st.send_window == 1 << 20 and conn.peer_max_frame == 1 << 15
    assert conn.frames()[-1][:2] == (h2.SETTINGS, h2.ACK)


def test_oversized_frame_and_bad_continuation_are_connection_errors() -> None:
    conn = Recorder()
    with pytest.raises(h2.H2ProtocolError):
        conn._receive(h2.frame(h2.DATA, 0, 1, b"x" * 20000))
    conn = Recorder()
    with pytest.raises(h2.H2ProtocolError):
        conn._receive(h2.frame(h2.CONTINUATION, h2.END_HEADERS, 1, b"\x88"))


def test_header_list_over_the_cap_is_refused_however_small_the_block() -> None:
    enc, dec = hpack.Encoder(), Decoder()
    dec.decode(enc.encode([("x-big", "v" * 4000)]))  # one 4 KB table entry...
    with pytest.raises(HpackError, match="header list over"):
        dec.decode(b"\xbe" * 100)  # ...referenced 100 times: 100 bytes that decode to 400 KB


def test_padding_is_credited_back_at_once() -> None:
    conn = Recorder()
    st = h2.Stream(1, conn)
    conn.streams[1] = st
    got: list[bytes] = []
    conn.on_data = lambda s, data, end: got.append(data)  # type: ignore[method-assign]
    padded = bytes([200]) + b"x" + bytes(200)  # pad length, 1 data byte, 200 bytes of padding
    for _ in range(2000):  # 400 KB of padding: over STREAM_WINDOW // 4, so an update is due
        conn._receive(h2.frame(h2.DATA, h2.PADDED, 1, padded))
    assert got[0] == b"x"
    credited = sum(int.from_bytes(p, "big") for t, _, sid, p in conn.frames() if t == h2.WINDOW_UPDATE and sid == 1)
    assert credited >= 200 * 2000 - h2.STREAM_WINDOW // 4


def test_a_forgotten_stream_never_sends_its_queued_data() -> None:
    conn = Recorder()
    st = h2.Stream(3, conn)
    conn.streams[3] = st
    conn.send_data(st, b"a" * 70000, True)  # 4535 bytes wait for window
    conn.frames()
    conn.forget(conn.streams.pop(3))  # what GOAWAY / connection loss / RST do
    conn._receive(h2.window_update(0, 100000) + h2.window_update(3, 100000))
    assert not [f for f in conn.frames() if f[0] == h2.DATA]


def test_first_header_block_starts_with_a_table_size_update_and_after_settings_change() -> None:
    conn = Recorder()
    st = h2.Stream(1, conn)
    conn.send_headers(st, b"\x88", False)
    conn.send_headers(st, b"\x88", False)
    blocks = [p for t, _, _, p in conn.frames() if t == h2.HEADERS]
    assert blocks == [b"\x20\x88", b"\x88"]
    conn._receive(h2.settings_frame({h2.S_HEADER_TABLE_SIZE: 0}))
    conn.send_headers(st, b"\x88", True)
    assert [p for t, _, _, p in conn.frames() if t == h2.HEADERS] == [b"\x20\x88"]


def test_a_full_transport_buffer_holds_data_and_the_source_credit_until_it_drains() -> None:
    src_conn, dst_conn = relay_pair()
    dst = dst_conn.streams[1]
    dst_conn.pause_writing()
    for _ in range(20):
        dst_conn.send_data(dst, b"x" * 16384, False)
    assert not [f for f in dst_conn.frames() if f[0] == h2.DATA]
    assert not [f for f in src_conn.frames() if f[0] == h2.WINDOW_UPDATE]  # the sender is held back
    dst_conn.resume_writing()
    assert sum(len(f[3]) for f in dst_conn.frames() if f[0] == h2.DATA) == 20 * 16384
    assert [f for f in src_conn.frames() if f[0] == h2.WINDOW_UPDATE]


def test_both_sides_advertise_the_header_list_cap() -> None:
    from modelyard.balancer.h2.hpack import MAX_HEADER_LIST
    from modelyard.balancer.proxy import DownstreamConnection
    from modelyard.balancer.upstream import UpstreamConnection

    for cls in (DownstreamConnection, UpstreamConnection):
        assert cls.local_settings[h2.S_MAX_HEADER_LIST_SIZE] == MAX_HEADER_LIST
        assert cls.local_settings[h2.S_INITIAL_WINDOW_SIZE] == h2.STREAM_WINDOW


# ------------------------------------------------------------------ limits against hostile peers


def test_table_size_updates_only_at_the_start_of_a_block_and_at_most_two() -> None:
    dec = Decoder(max_table_size=4096)
    assert dec.decode(b"\x20\x3f\xe1\x1f\x88") == ((b":status", b"200"),)  # 0, then 4096: allowed
    with pytest.raises(HpackError, match="after a header field"):
        Decoder().decode(b"\x88\x20")
    with pytest.raises(HpackError, match="more than 2"):
        Decoder().decode(b"\x20\x20\x20\x88")


def test_a_header_list_cap_of_our_own_choosing() -> None:
    block = encode(((b"x-a", b"v" * 5000),))
    assert Decoder().decode(block) == ((b"x-a", b"v" * 5000),)
    with pytest.raises(HpackError, match="over 4096"):
        Decoder(max_list=4096).decode(block)


def test_decoder_caches_are_bounded_in_bytes_and_skip_big_strings() -> None:
    enc, dec = hpack.Encoder(), Decoder(cache_bytes=16384)
    for i in range(300):  # distinct Huffman-coded values, some big
        size = 3000 if i % 3 == 0 else 40
        headers = [(":method", "POST"), ("x-v", f"{i:05d}" + "a" * size)]
        block = enc.encode(headers, huffman=True)
        assert dec.decode(block) == as_bytes(headers)
        assert dec._cache_bytes <= 16384
        assert not [s for s in dec._strings.values() if len(s) > 16384 // 16]


def test_encoder_caches_are_bounded_in_bytes() -> None:
    from modelyard.balancer.h2 import hpack as ours

    ours.set_cache_budget(32768)
    try:
        for i in range(2000):
            encode(((b":status", b"200"), (b"x-v", b"%d" % i + b"b" * (30 if i % 2 else 5000))))
            assert ours._bytes["fields"] <= 32768 and ours._bytes["blocks"] <= 32768
        assert not [h for h in ours._fields if len(h[1]) > 2048]
    finally:
        ours.set_cache_budget(ours.ENCODER_CACHE_BYTES)


def test_request_head_cache_is_bounded_in_bytes() -> None:
    from modelyard.balancer.request_head import HeadCache, RequestHead

    cache = HeadCache(65536)
    for i in range(500):
        headers = as_bytes([*REQUEST, ("x-v", f"{i}" + "c" * (20 if i % 2 else 20000))])
        cache.put(headers, RequestHead(headers))
        assert cache.nbytes <= 65536
    assert cache and all(len(dict(h)[b"x-v"]) < 100 for h in cache)


def test_data_over_the_stream_window_resets_the_stream_with_flow_control_error() -> None:
    conn = Recorder()
    st = h2.Stream(1, conn)
    conn.streams[1] = st
    failed: list[str] = []
    st.handler = type("H", (), {"on_failed": lambda self, reason: failed.append(reason)})()  # type: ignore[assignment]
    conn.on_data = lambda s, data, end: None  # type: ignore[method-assign]  # never forwarded: no credit
    chunk = h2.frame(h2.DATA, 0, 1, b"x" * 16384)
    conn._receive(chunk * (h2.STREAM_WINDOW // 16384))  # exactly the window: fine
    assert 1 in conn.streams and not failed
    conn._receive(h2.frame(h2.DATA, 0, 1, b"x"))  # one byte more
    assert [(t, int.from_bytes(p, "big")) for t, _, sid, p in conn.frames() if t == h2.RST_STREAM] == \
        [(h2.RST_STREAM, h2.FLOW_CONTROL_ERROR)]
    assert 1 not in conn.streams and failed and "stream window" in failed[0]


class FakeTransport:
    """What an H2Connection uses of an asyncio transport; ``backlog`` is what the peer has not read."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.backlog = 0
        self.reading = True
        self.closed = self.aborted = self.eof = False
        self.protocol: h2.H2Connection | None = None

    def write(self, data: bytes) -> None:
        self.written += data

    def get_write_buffer_size(self) -> int:
        return self.backlog

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def frames(self) -> list[tuple[int, int, int, bytes]]:
        out, raw = [], bytes(self.written)
        while raw:
            n = int.from_bytes(raw[:3], "big")
            out.append((raw[3], raw[4], int.from_bytes(raw[5:9], "big"), raw[9:9 + n]))
            raw = raw[9 + n:]
        self.written.clear()
        return out


class Guarded(h2.H2Connection):
    """A client-side-like connection (guarded, window credited as bytes leave) on a fake transport."""

    guarded = True
    credit_on_receipt = False

    def __init__(self, **limits: object) -> None:
        from modelyard.balancer.limits import LimitsConfig

        super().__init__(h2.Flusher(), LimitsConfig(**limits))  # type: ignore[arg-type]
        self.t = FakeTransport()
        self._start_transport(self.t)
        self.got: list[tuple[int, bytes, bool]] = []

    def on_headers(self, sid: int, headers: object, end_stream: bool) -> None:
        st = h2.Stream(sid, self)
        st.remote_closed = end_stream
        self.streams[sid] = st
        self.last_peer_stream = sid

    def on_data(self, st: h2.Stream, data: bytes, end_stream: bool) -> None:
        self.got.append((st.id, data, end_stream))

    def _idle(self, sid: int) -> bool:
        return not sid & 1 or sid > self.last_peer_stream


def goaway(frames: list[tuple[int, int, int, bytes]]) -> int | None:
    return next((int.from_bytes(p[4:8], "big") for t, _, _, p in frames if t == h2.GOAWAY), None)


async def test_the_connection_window_comes_back_as_bytes_leave_not_on_receipt() -> None:
    conn = Guarded(stream_buffer_bytes=1 << 20, connection_buffer_bytes=1 << 20)
    conn.data_received(h2.settings_frame({}) + h2.frame(h2.HEADERS, h2.END_HEADERS, 1, b"\x88")
                       + h2.frame(h2.HEADERS, h2.END_HEADERS, 3, b"\x88"))
    conn.t.frames()
    conn.data_received(h2.frame(h2.DATA, 0, 1, b"x" * 16384) * 40)  # 640 KiB held, nothing forwarded
    assert not [f for f in conn.t.frames() if f[0] == h2.WINDOW_UPDATE]
    conn.consumed(conn.streams[1], 16384 * 20)  # 320 KiB forwarded: over a quarter window, both come back
    conn.flush()
    updates = {sid: int.from_bytes(p, "big") for t, _, sid, p in conn.t.frames() if t == h2.WINDOW_UPDATE}
    assert updates == {0: 16384 * 20, 1: 16384 * 20}
    conn.data_received(h2.frame(h2.DATA, 0, 3, b"y" * 16384) * 25)  # 400 KiB more: 720 KiB held
    conn.reset(conn.streams[1], h2.CANCEL)  # the 320 KiB stream 1 still held come back with it
    conn.flush()
    assert [int.from_bytes(p, "big") for t, _, sid, p in conn.t.frames() if t == h2.WINDOW_UPDATE and sid == 0] \
        == [16384 * 20]
    conn.data_received(h2.frame(h2.DATA, 0, 3, b"y" * 16384) * 40)  # 400 + 640 KiB held: over 1 MiB
    assert goaway(conn.t.frames()) == h2.FLOW_CONTROL_ERROR and conn.closed and conn.t.eof


@pytest.mark.parametrize("reads", [False, True])
async def test_control_frames_queued_for_a_peer_that_does_not_read_are_bounded(reads: bool) -> None:
    conn = Guarded(max_control_frames=100)
    conn.data_received(h2.settings_frame({}))
    conn.t.backlog = 0 if reads else 1 << 20
    for _ in range(30):
        conn.data_received(h2.frame(h2.PING, 0, 0, b"12345678") * 20)
        await asyncio.sleep(0)  # let any turn left for later run
    frames = conn.t.frames()
    if reads:
        assert not conn.closed and sum(1 for f in frames if f[0] == h2.PING) == 600
    else:
        assert conn.closed and goaway(frames) == h2.ENHANCE_YOUR_CALM
        assert sum(1 for f in frames if f[0] == h2.PING) <= 100


async def test_reading_stops_while_the_write_buffer_is_full_and_frames_wait_their_turn() -> None:
    conn = Guarded(frames_per_read=10)
    conn.data_received(h2.settings_frame({}))
    conn.pause_writing()
    assert not conn.t.reading
    conn.resume_writing()
    assert conn.t.reading
    conn.t.frames()
    conn.data_received(h2.frame(h2.PING, 0, 0, b"12345678") * 35)
    assert sum(1 for f in conn.t.frames() if f[0] == h2.PING) == 10 and not conn.t.reading
    conn.pause_writing()  # a full write buffer also holds the frames waiting for their turn
    for _ in range(5):
        await asyncio.sleep(0)
    assert not conn.t.frames()
    conn.resume_writing()
    for _ in range(5):
        await asyncio.sleep(0)
    assert sum(1 for f in conn.t.frames() if f[0] == h2.PING) == 25 and conn.t.reading


@pytest.mark.parametrize(("data", "code"), [
    (h2.frame(h2.HEADERS, 0, 1, b"\x88") + h2.frame(h2.CONTINUATION, 0, 1, b"") * 2, h2.ENHANCE_YOUR_CALM),
    (h2.frame(h2.HEADERS, 0, 1, b"\x88") + h2.frame(h2.CONTINUATION, 0, 1, b"\x88") * 9, h2.ENHANCE_YOUR_CALM),
    (h2.frame(h2.HEADERS, 0, 1, b"\x88") + h2.frame(h2.CONTINUATION, 0, 1, b"\x88" * 16384) * 5, h2.ENHANCE_YOUR_CALM),
    (h2.frame(h2.HEADERS, h2.PADDED | h2.END_HEADERS, 1, b""), h2.PROTOCOL_ERROR),
    (h2.frame(h2.GOAWAY, 0, 0, b"\x00\x00"), h2.FRAME_SIZE_ERROR),
    (h2.frame(h2.DATA, 0, 0, b"x"), h2.PROTOCOL_ERROR),
    (h2.window_update(0, 0), h2.PROTOCOL_ERROR),
    (h2.window_update(0, (1 << 31) - 1), h2.FLOW_CONTROL_ERROR),
    (h2.frame(h2.RST_STREAM, 0, 3, bytes(4)), h2.PROTOCOL_ERROR),
    (h2.settings_frame({h2.S_INITIAL_WINDOW_SIZE: 1 << 31}), h2.FLOW_CONTROL_ERROR),
])
async def test_frame_errors_end_the_connection_with_their_code(data: bytes, code: int) -> None:
    conn = Guarded(max_header_list_bytes=65536)
    conn.data_received(h2.settings_frame({}) + data)
    assert goaway(conn.t.frames()) == code and conn.closed


async def test_stream_errors_reset_only_the_stream() -> None:
    conn = Guarded()
    conn.data_received(h2.settings_frame({}) + h2.frame(h2.HEADERS, h2.END_HEADERS, 1, b"\x88")
                       + h2.frame(h2.HEADERS, h2.END_HEADERS, 3, b"\x88")
                       + h2.frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, 5, b"\x88")
                       + h2.window_update(1, 0) + h2.window_update(3, (1 << 31) - 1) + h2.frame(h2.DATA, 0, 5, b"x")
                       + h2.frame(h2.DATA, 0, 1, b"late"))  # on a stream it already reset: ignored
    frames = conn.t.frames()
    assert {sid: int.from_bytes(p, "big") for t, _, sid, p in frames if t == h2.RST_STREAM} == \
        {1: h2.PROTOCOL_ERROR, 3: h2.FLOW_CONTROL_ERROR, 5: h2.STREAM_CLOSED}
    assert goaway(frames) is None and not conn.closed


def test_limits_are_validated_with_their_paths() -> None:
    from modelyard.balancer.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError) as info:
        config_from_dict({"pools": {"p": {}}, "limits": {"max_concurrent_streams": 0, "stream_buffer_bytes": 100,
                                                         "reset_ratio": 2, "idle_timeout": -1}})
    errors = "\n".join(info.value.errors)
    for path in ("limits.max_concurrent_streams", "limits.stream_buffer_bytes", "limits.reset_ratio",
                 "limits.idle_timeout"):
        assert path in errors
    assert config_from_dict({"pools": {"p": {}}}).limits.max_concurrent_streams == 100


async def test_the_heap_is_trimmed_when_much_was_freed_and_not_again_for_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from modelyard.balancer import heap

    free = {"bytes": 0}
    trims: list[int] = []
    monkeypatch.setattr(heap, "_glibc", lambda: (lambda: free["bytes"], lambda: trims.append(free["bytes"])))
    monkeypatch.setattr(heap, "rss_bytes", lambda: 100 << 20)
    task = asyncio.ensure_future(heap.trim_heap_forever(0.01, threshold=32 << 20))
    try:
        async def ticks(n: int) -> None:
            for _ in range(n):
                await asyncio.sleep(0.012)

        await ticks(3)
        assert not trims  # nothing free
        free["bytes"] = 200 << 20  # a burst ended
        await ticks(3)
        assert trims == [200 << 20]  # trimmed once; trimmed pages still count as free: not again
        free["bytes"] = 250 << 20  # +50 MiB freed since
        await ticks(3)
        assert trims == [200 << 20, 250 << 20]
    finally:
        task.cancel()
