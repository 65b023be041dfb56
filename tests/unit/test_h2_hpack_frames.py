"""HPACK decoding/encoding and HTTP/2 flow control of the balancer's data plane, without sockets."""

from __future__ import annotations

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
