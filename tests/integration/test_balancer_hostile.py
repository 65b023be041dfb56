"""Attackers on raw sockets against the balancer's HTTP/2 server while a good client keeps calling.

Every test runs one attack (bounded in count and time, 127.0.0.1 only) while a good client sends
unary calls at 20/s through the same balancer, and checks that the good client saw no failure,
that the attack ended the way the limit says (GOAWAY code, RST_STREAM code, refused connection)
and that what the balancer holds stayed bounded. Backends are in-process grpc.aio servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import grpc
import pytest

from modelyard.balancer.app import Balancer
from modelyard.balancer.config import config_from_dict
from modelyard.balancer.h2 import connection as h2
from modelyard.balancer.h2 import hpack
from modelyard.balancer.h2.hpack import encode
from modelyard.launcher import until as launcher_until

Frame = tuple[int, int, int, bytes]

UNARY = encode(((b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/t.T/Unary"),
                (b":authority", b"x"), (b"content-type", b"application/grpc"), (b"te", b"trailers")))
SINK = encode(((b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/t.T/Sink"),
               (b":authority", b"x"), (b"content-type", b"application/grpc"), (b"te", b"trailers")))


class Backend:
    """An in-process gRPC server: ``Unary`` echoes; ``Sink`` (client streaming) never reads its request."""

    def __init__(self) -> None:
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.calls = 0

    async def start(self) -> None:
        async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            self.calls += 1
            return request

        async def sink(it: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
            self.calls += 1
            await asyncio.sleep(30)
            return b""

        handlers = grpc.method_handlers_generic_handler("t.T", {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Sink": grpc.stream_unary_rpc_method_handler(sink),
        })
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers((handlers,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    b = Backend()
    await b.start()
    yield b
    await b.stop()


@contextlib.asynccontextmanager
async def stingy_upstream() -> AsyncIterator[int]:
    """An HTTP/2 server that grants no stream window (SETTINGS_INITIAL_WINDOW_SIZE 0) and never answers:
    whatever the balancer relays to it waits in the balancer."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(h2.settings_frame({h2.S_INITIAL_WINDOW_SIZE: 0}) + h2.frame(h2.SETTINGS, h2.ACK, 0))
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass
        writer.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield srv.sockets[0].getsockname()[1]
    finally:
        srv.close()


@contextlib.asynccontextmanager
async def balancer(backend: Backend, stingy: int | None = None, **limits: Any) -> AsyncIterator[Balancer]:
    """The balancer in front of ``backend``; calls to ``/t.T/Sink`` and ``Held`` go to the ``stingy`` port when given."""
    pools = {"p": {"picker": "round_robin", "endpoints": {"static": [f"127.0.0.1:{backend.port}"]},
                   "health_check": {"enabled": False}}}
    routes: list[dict[str, Any]] = []
    if stingy is not None:
        pools["s"] = {"endpoints": {"static": [f"127.0.0.1:{stingy}"]}, "health_check": {"enabled": False}}
        routes = [{"match": {"method": "Sink"}, "pool": "s"}, {"match": {"method": "Held"}, "pool": "s"},
                  {"match": {}, "pool": "p"}]
    cfg = config_from_dict({
        "listeners": [{"address": "127.0.0.1:0"}],
        "admin": {"address": None},
        "unary_methods": ["/t.T/Unary"],
        "pools": pools,
        "routes": routes,
        "limits": limits,
    })
    b = Balancer(cfg)
    await b.start()
    try:
        yield b
    finally:
        await b.close()


@dataclass
class GoodClient:
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)


@contextlib.asynccontextmanager
async def good_client(b: Balancer, rate: float = 20.0, min_calls: int = 5) -> AsyncIterator[GoodClient]:
    """Unary calls at ``rate``/s (open loop) through ``b`` while the block runs, and at least ``min_calls``."""
    g = GoodClient()
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{b.ports[0]}")
    call = ch.unary_unary("/t.T/Unary")
    assert await call(b"warm", timeout=5) == b"warm"
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    async def one() -> None:
        t0 = time.perf_counter()
        try:
            assert await call(b"good", timeout=5) == b"good"
            g.ok += 1
            g.latencies.append(time.perf_counter() - t0)
        except grpc.aio.AioRpcError as exc:
            g.failed.append(f"{exc.code().name}: {exc.details()}")

    async def run() -> None:
        tasks: set[asyncio.Task[None]] = set()
        t = loop.time()
        while not stop.is_set():
            task = loop.create_task(one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            t += 1 / rate
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, t - loop.time()))
        await asyncio.gather(*tasks)

    runner = loop.create_task(run())
    try:
        yield g
        await until(lambda: g.ok + len(g.failed) >= min_calls, what=f"{min_calls} good calls")
    finally:
        stop.set()
        await runner
        await ch.close()


class Attacker:
    """A raw HTTP/2 client on a plain socket: writes what it is told, reads only when asked."""

    def __init__(self, port: int, rcvbuf: int | None = None) -> None:
        self.port = port
        self.rcvbuf = rcvbuf
        self.sock: socket.socket | None = None
        self.loop = asyncio.get_running_loop()
        self._rest = b""

    async def open(self, preface: bool = True) -> Attacker:
        s = socket.socket()
        if self.rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        s.setblocking(False)
        await self.loop.sock_connect(s, ("127.0.0.1", self.port))
        self.sock = s
        if preface:
            await self.send(h2.PREFACE + h2.settings_frame({}))
        return self

    async def send(self, data: bytes, stall: float = 2.0) -> bool:
        """Write ``data``; False when the balancer stopped reading (no progress for ``stall`` s) or closed."""
        assert self.sock is not None
        try:
            await asyncio.wait_for(self.loop.sock_sendall(self.sock, data), stall)
            return True
        except (TimeoutError, ConnectionError):
            return False

    async def frames(self, until: Callable[[Frame], bool] | None = None,
                     timeout: float = 10.0) -> list[Frame]:  # noqa: ASYNC109
        """Read and parse frames until ``until(frame)``, EOF or ``timeout``."""
        assert self.sock is not None
        out: list[Frame] = []
        buf = self._rest
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pos = 0
            while len(buf) - pos >= 9 and len(buf) - pos >= 9 + int.from_bytes(buf[pos:pos + 3], "big"):
                n = int.from_bytes(buf[pos:pos + 3], "big")
                f = (buf[pos + 3], buf[pos + 4], int.from_bytes(buf[pos + 5:pos + 9], "big") & 0x7FFFFFFF,
                     buf[pos + 9:pos + 9 + n])
                pos += 9 + n
                out.append(f)
                if until is not None and until(f):
                    self._rest = buf[pos:]
                    return out
            buf = buf[pos:]
            try:
                data = await asyncio.wait_for(self.loop.sock_recv(self.sock, 1 << 20), deadline - time.monotonic())
            except (TimeoutError, ConnectionError):
                break
            if not data:
                break
            buf += data
        self._rest = buf
        return out

    async def closed(self, timeout: float = 10.0) -> bool:  # noqa: ASYNC109
        """The balancer closed the connection within ``timeout`` (EOF or reset), reading and dropping the rest."""
        assert self.sock is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = await asyncio.wait_for(self.loop.sock_recv(self.sock, 1 << 20), deadline - time.monotonic())
            except ConnectionError:
                return True
            except TimeoutError:
                return False
            if not data:
                return True
        return False

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


@contextlib.asynccontextmanager
async def attacker(port: int, preface: bool = True, rcvbuf: int | None = None) -> AsyncIterator[Attacker]:
    a = Attacker(port, rcvbuf)
    try:
        yield await a.open(preface)
    finally:
        a.close()


async def connection_of(b: Balancer, a: Attacker) -> Any:
    """The balancer's side of the attacker's connection."""
    assert a.sock is not None
    me = a.sock.getsockname()

    def find() -> Any:
        return next((c for c in b.proxy.connections if c.transport.get_extra_info("peername") == me), None)

    await until(lambda: find() is not None, what="the attacker's connection")
    return find()


def goaway_code(frames: list[Frame]) -> int | None:
    for t, _, _, p in frames:
        if t == h2.GOAWAY:
            return int.from_bytes(p[4:8], "big")
    return None


def is_goaway(f: Frame) -> bool:
    return f[0] == h2.GOAWAY


def rst_codes(frames: list[Frame]) -> dict[int, int]:
    return {sid: int.from_bytes(p, "big") for t, _, sid, p in frames if t == h2.RST_STREAM}


until = partial(launcher_until, timeout=10.0, interval=0.02)


def assert_good(g: GoodClient, at_least: int = 5) -> None:
    assert not g.failed, g.failed
    assert g.ok >= at_least, f"the good client completed only {g.ok} calls"


# ------------------------------------------------------------------ floods of control frames


@pytest.mark.parametrize("kind", ["ping", "settings"])
async def test_a_control_frame_flood_into_a_connection_that_never_reads_ends_with_enhance_your_calm(
        backend: Backend, kind: str) -> None:
    one = h2.frame(h2.PING, 0, 0, b"12345678") if kind == "ping" else h2.settings_frame({h2.S_MAX_FRAME_SIZE: 16384})
    async with balancer(backend) as b, good_client(b) as g, attacker(b.ports[0], rcvbuf=4096) as a:
        conn = await connection_of(b, a)
        sent = 0
        # the kernel's buffers take the first megabytes of ACKs; then they queue in the balancer
        while sent < 1_000_000 and not conn.closed and await a.send(one * 4000, stall=1.0):
            sent += 4000
        await until(lambda: conn.closed, what="the balancer to give up on the flooding connection")
        assert len(conn._wbuf) <= 1 and conn.transport.get_write_buffer_size() < 2 << 20
        frames = await a.frames(until=is_goaway)  # reading now: the GOAWAY is behind the ACKs it queued
        assert goaway_code(frames) == h2.ENHANCE_YOUR_CALM
        assert await a.closed()
        await until(lambda: conn not in b.proxy.connections, what="attacker dropped")
    assert_good(g)


async def test_a_client_that_reads_its_acks_may_ping_without_being_cut_off(backend: Backend) -> None:
    async with balancer(backend) as b, good_client(b) as g, attacker(b.ports[0]) as a:
        acks = 0
        for _ in range(10):
            assert await a.send(h2.frame(h2.PING, 0, 0, b"12345678") * 3000)
            frames = await a.frames(timeout=0.2)
            assert goaway_code(frames) is None
            acks += sum(1 for f in frames if f[0] == h2.PING and f[1] & h2.ACK)
        frames = await a.frames(timeout=1.0)
        acks += sum(1 for f in frames if f[0] == h2.PING and f[1] & h2.ACK)
        assert acks == 30_000
    assert_good(g, at_least=1)


# ------------------------------------------------------------------ flow control


async def test_data_beyond_the_stream_window_is_a_flow_control_error_and_nothing_is_buffered(
        backend: Backend) -> None:
    chunk = h2.frame(h2.DATA, 0, 1, b"\x00" * 16384)
    async with stingy_upstream() as stingy, balancer(backend, stingy) as b, good_client(b) as g, \
            attacker(b.ports[0]) as a:
        await a.send(h2.frame(h2.HEADERS, h2.END_HEADERS, 1, SINK))
        sent = 0
        while sent < (8 << 20) and await a.send(chunk * 16):  # 8 MiB at a 1 MiB window, ignoring updates
            sent += 16 * 16384
        frames = await a.frames(until=lambda f: f[0] == h2.RST_STREAM and f[2] == 1)
        assert rst_codes(frames).get(1) == h2.FLOW_CONTROL_ERROR
        assert not [f for f in frames if f[0] == h2.WINDOW_UPDATE and f[2] == 1]  # nothing left the balancer
        assert goaway_code(frames) is None  # a stream error: the connection lives on
        conn = await connection_of(b, a)
        assert not conn.streams
        # nothing of the stream is held: the upstream queue was dropped with the stream
        up = b.pools["s"].endpoints[f"127.0.0.1:{stingy}"].upstream
        assert up is not None
        await until(lambda: all(not c.streams for c in up.conns), what="the upstream stream reset")
        # and the connection is usable: the window the stream held came back
        assert conn.recv_window + conn.recv_unacked == conn.conn_window
    assert_good(g)


async def test_data_beyond_the_connection_window_is_a_connection_flow_control_error(backend: Backend) -> None:
    # streams of 256 KiB (their whole window) held by a stingy upstream: after four, 1 MiB is held,
    # so the fifth stream's bytes are over the 1 MiB connection window
    async with stingy_upstream() as stingy, \
            balancer(backend, stingy, stream_buffer_bytes=256 << 10, connection_buffer_bytes=1 << 20) as b, \
            good_client(b) as g, attacker(b.ports[0]) as a:
        data = b""
        for sid in (1, 3, 5, 7, 9):
            data += h2.frame(h2.HEADERS, h2.END_HEADERS, sid, SINK)
            data += h2.frame(h2.DATA, 0, sid, b"\x00" * 16384) * 16
        await a.send(data)
        frames = await a.frames(until=is_goaway)
        assert goaway_code(frames) == h2.FLOW_CONTROL_ERROR
        assert not [f for f in frames if f[0] == h2.WINDOW_UPDATE and f[2] > 0]
        assert await a.closed()
    assert_good(g)


# ------------------------------------------------------------------ headers


def huffman(prefix: bytes, filler: int, count: int) -> bytes:
    """RFC 7541 Huffman code of ``prefix`` + ``count`` x ``filler`` (fast: one big-integer splice)."""
    from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH

    bits, nbits = 0, 0
    for c in prefix:
        bits = (bits << REQUEST_CODES_LENGTH[c]) | REQUEST_CODES[c]
        nbits += REQUEST_CODES_LENGTH[c]
    code, n = REQUEST_CODES[filler], REQUEST_CODES_LENGTH[filler]
    rep = int(bin(code)[2:].zfill(n) * count, 2)
    bits, nbits = (bits << (n * count)) | rep, nbits + n * count
    pad = -nbits % 8
    return ((bits << pad) | ((1 << pad) - 1)).to_bytes((nbits + pad) // 8, "big")


def literal(name: bytes, huffman_value: bytes) -> bytes:
    """A literal field without indexing, new name, Huffman-coded value."""
    def length(n: int, first: int) -> bytes:
        if n < 127:
            return bytes((first | n,))
        out, n = bytearray((first | 127,)), n - 127
        while n >= 128:
            out.append((n & 127) | 128)
            n >>= 7
        return bytes(out) + bytes((n,))
    return b"\x00" + length(len(name), 0) + name + length(len(huffman_value), 0x80) + huffman_value


async def test_distinct_big_header_values_leave_the_caches_within_their_byte_budget(backend: Backend) -> None:
    budget = 1 << 20
    async with balancer(backend, header_cache_bytes=budget, connection_header_cache_bytes=64 << 10) as b, \
            good_client(b) as g:
        async with attacker(b.ports[0]) as a:
            for i in range(200):  # one distinct 50 KB value per request, Huffman-coded (the string cache sees it)
                sid = 2 * i + 1
                block = UNARY + literal(b"x-big", huffman(b"%06d" % i, ord("v"), 50_000))
                parts = [block[j:j + 16384] for j in range(0, len(block), 16384)]
                data = h2.frame(h2.HEADERS, h2.END_HEADERS if len(parts) == 1 else 0, sid, parts[0])
                for k, p in enumerate(parts[1:], 1):
                    data += h2.frame(h2.CONTINUATION, h2.END_HEADERS if k == len(parts) - 1 else 0, sid, p)
                data += h2.frame(h2.DATA, h2.END_STREAM, sid, b"\x00\x00\x00\x00\x02ok")
                await a.send(data)
                if i % 20 == 19:
                    def answered(f: Frame, s: int = sid) -> bool:
                        return f[0] == h2.HEADERS and f[2] == s and bool(f[1] & h2.END_STREAM)
                    assert goaway_code(await a.frames(until=answered)) is None
            conn = await connection_of(b, a)
            assert conn.last_peer_stream == 399
            assert conn.decoder._cache_bytes <= 64 << 10
            assert not [s for s in conn.decoder._strings.values() if len(s) > 4096]
        assert b.proxy._heads.nbytes <= budget
        assert all(n <= budget for n in hpack._bytes.values())
        assert not [h for h in b.proxy._heads for _, v in h if len(v) > 50_000]
        assert not [f for f in hpack._fields if len(f[1]) > 50_000]
    assert_good(g)


async def test_a_block_of_table_size_updates_is_a_compression_error_without_stalling(backend: Backend) -> None:
    async with balancer(backend) as b, good_client(b) as g:
        for block in (b"\x20" * 3 + UNARY,  # three updates: at most two
                      UNARY + b"\x20"):     # an update after a field
            async with attacker(b.ports[0]) as a:
                await a.send(h2.frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, 1, block))
                assert goaway_code(await a.frames(until=is_goaway)) == h2.COMPRESSION_ERROR
        # a 1 MB header block of size updates: refused at its first frames, long before 1 MB is decoded
        async with attacker(b.ports[0]) as a:
            t0 = time.perf_counter()
            data = h2.frame(h2.HEADERS, 0, 1, b"\x3f\xe1\x1f" * 5461)
            for i in range(63):
                data += h2.frame(h2.CONTINUATION, h2.END_HEADERS if i == 62 else 0, 1, b"\x3f\xe1\x1f" * 5461)
            await a.send(data)
            frames = await a.frames(until=is_goaway)
            assert goaway_code(frames) in (h2.ENHANCE_YOUR_CALM, h2.COMPRESSION_ERROR)
            assert time.perf_counter() - t0 < 2.0
    assert_good(g)


async def test_a_continuation_flood_ends_with_enhance_your_calm(backend: Backend) -> None:
    async with balancer(backend) as b, good_client(b) as g:
        for payload in (b"", b"\x88"):  # empty CONTINUATIONs, then tiny ones
            async with attacker(b.ports[0]) as a:
                await a.send(h2.frame(h2.HEADERS, 0, 1, UNARY[:4]) + h2.frame(h2.CONTINUATION, 0, 1, payload) * 50_000,
                             stall=0.5)
                assert goaway_code(await a.frames(until=is_goaway)) == h2.ENHANCE_YOUR_CALM
                assert await a.closed()
    assert_good(g)


# ------------------------------------------------------------------ frames that break the rules


BAD_FRAMES = {
    "padded HEADERS, empty payload": (h2.frame(h2.HEADERS, h2.PADDED | h2.END_HEADERS, 1, b""), h2.PROTOCOL_ERROR),
    "padding longer than HEADERS": (h2.frame(h2.HEADERS, h2.PADDED | h2.END_HEADERS, 1, b"\x09abc"), h2.PROTOCOL_ERROR),
    "PRIORITY flag, short payload": (h2.frame(h2.HEADERS, 0x20 | h2.END_HEADERS, 1, b"\x00\x00"), h2.FRAME_SIZE_ERROR),
    "GOAWAY of 4 bytes": (h2.frame(h2.GOAWAY, 0, 0, b"\x00\x00\x00\x00"), h2.FRAME_SIZE_ERROR),
    "GOAWAY on a stream": (h2.frame(h2.GOAWAY, 0, 1, bytes(8)), h2.PROTOCOL_ERROR),
    "DATA on stream 0": (h2.frame(h2.DATA, 0, 0, b"x"), h2.PROTOCOL_ERROR),
    "DATA on an idle stream": (h2.frame(h2.DATA, 0, 7, b"x"), h2.PROTOCOL_ERROR),
    "WINDOW_UPDATE of 0": (h2.window_update(0, 0), h2.PROTOCOL_ERROR),
    "WINDOW_UPDATE past 2^31-1": (h2.window_update(0, (1 << 31) - 1), h2.FLOW_CONTROL_ERROR),
    "WINDOW_UPDATE on an idle stream": (h2.window_update(9, 1), h2.PROTOCOL_ERROR),
    "RST_STREAM on an idle stream": (h2.frame(h2.RST_STREAM, 0, 5, bytes(4)), h2.PROTOCOL_ERROR),
    "RST_STREAM of 3 bytes": (h2.frame(h2.RST_STREAM, 0, 1, bytes(3)), h2.FRAME_SIZE_ERROR),
    "PING on a stream": (h2.frame(h2.PING, 0, 1, bytes(8)), h2.PROTOCOL_ERROR),
    "SETTINGS ACK with a payload": (h2.frame(h2.SETTINGS, h2.ACK, 0, bytes(6)), h2.FRAME_SIZE_ERROR),
    "SETTINGS_ENABLE_PUSH of 2": (h2.settings_frame({h2.S_ENABLE_PUSH: 2}), h2.PROTOCOL_ERROR),
    "PRIORITY of 4 bytes": (h2.frame(h2.PRIORITY, 0, 1, bytes(4)), h2.FRAME_SIZE_ERROR),
    "PUSH_PROMISE from a client": (h2.frame(h2.PUSH_PROMISE, h2.END_HEADERS, 1, bytes(4)), h2.PROTOCOL_ERROR),
    "HEADERS on an even stream": (h2.frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, 2, UNARY), h2.PROTOCOL_ERROR),
    "frame over 16 KiB": (h2.frame(0xF0, 0, 0, bytes(20000)), h2.FRAME_SIZE_ERROR),
    "empty DATA frames": (h2.frame(h2.HEADERS, h2.END_HEADERS, 1, UNARY) + h2.frame(h2.DATA, 0, 1, b"") * 3,
                          h2.ENHANCE_YOUR_CALM),
}


async def test_frames_that_break_rfc_9113_get_their_goaway_code_and_no_traceback(
        backend: Backend, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="modelyard.balancer")
    async with balancer(backend) as b, good_client(b) as g:
        for name, (data, code) in BAD_FRAMES.items():
            async with attacker(b.ports[0]) as a:
                await a.send(data)
                got = goaway_code(await a.frames(until=is_goaway))
                assert got == code, f"{name}: GOAWAY {got}, expected {code}"
                assert await a.closed(), name
        # the first frame after the preface must be SETTINGS
        async with attacker(b.ports[0], preface=False) as a:
            await a.send(h2.PREFACE + h2.frame(h2.PING, 0, 0, bytes(8)))
            assert goaway_code(await a.frames(until=is_goaway)) == h2.PROTOCOL_ERROR
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info], \
        [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert_good(g)


async def test_stream_level_errors_reset_the_stream_only(backend: Backend) -> None:
    async with balancer(backend) as b, good_client(b) as g, attacker(b.ports[0]) as a:
        await a.send(h2.frame(h2.HEADERS, h2.END_HEADERS, 1, SINK) + h2.window_update(1, 0)
                     + h2.frame(h2.HEADERS, h2.END_HEADERS, 3, SINK) + h2.window_update(3, (1 << 31) - 1)
                     + h2.frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, 5, UNARY) + h2.frame(h2.DATA, 0, 5, b"x"))
        frames = await a.frames(until=lambda f: f[0] == h2.RST_STREAM and f[2] == 5)
        assert rst_codes(frames) == {1: h2.PROTOCOL_ERROR, 3: h2.FLOW_CONTROL_ERROR, 5: h2.STREAM_CLOSED}
        assert goaway_code(frames) is None
    assert_good(g)


# ------------------------------------------------------------------ streams and connections


async def test_rapid_reset_ends_with_enhance_your_calm_and_few_streams_reach_the_backend(backend: Backend) -> None:
    async with balancer(backend) as b, good_client(b) as g:
        before = backend.calls
        async with attacker(b.ports[0]) as a:
            data = b"".join(h2.frame(h2.HEADERS, h2.END_HEADERS, sid, UNARY)
                            + h2.frame(h2.DATA, h2.END_STREAM, sid, b"\x00\x00\x00\x00\x01r")
                            + h2.frame(h2.RST_STREAM, 0, sid, h2._U32.pack(h2.CANCEL))
                            for sid in range(1, 2 * 25_000, 2))
            await a.send(data, stall=1.0)
            frames = await a.frames(until=is_goaway)
            assert goaway_code(frames) == h2.ENHANCE_YOUR_CALM
            last = int.from_bytes(next(f for f in frames if f[0] == h2.GOAWAY)[3][:4], "big")
            assert last <= 2 * 260
            assert await a.closed()
        # a call starts when the read that opened its stream is processed: a stream reset in the same
        # read never reaches the backend (only one cut between two reads can)
        assert backend.calls - before - g.ok <= 20, backend.calls - before - g.ok
    assert_good(g)


async def test_cancelling_calls_at_their_deadline_is_not_a_rapid_reset(backend: Backend) -> None:
    """A client that queued calls behind max_concurrent_streams opens them close to their deadlines and
    resets them as the deadlines pass (grpc does, under overload): not premature resets, however many."""
    timed = encode(((b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/t.T/Sink"), (b":authority", b"x"),
                    (b"content-type", b"application/grpc"), (b"te", b"trailers"), (b"grpc-timeout", b"100m")))
    async with balancer(backend) as b, good_client(b) as g:
        async with attacker(b.ports[0]) as a:
            conn = await connection_of(b, a)
            sid = 1
            for _ in range(6):  # 6 x 80 = 480 resets: over reset_limit (250) and half of the streams opened
                ids = range(sid, sid + 160, 2)
                sid += 160
                await a.send(b"".join(h2.frame(h2.HEADERS, h2.END_HEADERS, i, timed)
                                      + h2.frame(h2.DATA, 0, i, b"\x00\x00\x00\x00\x01r") for i in ids))
                await asyncio.sleep(0.095)  # just before the balancer's own deadline timer
                await a.send(b"".join(h2.frame(h2.RST_STREAM, 0, i, h2._U32.pack(h2.CANCEL)) for i in ids))
                await asyncio.sleep(0.05)
            assert goaway_code(await a.frames(until=is_goaway, timeout=0.5)) is None
            assert conn.early_resets < 250, conn.early_resets
    assert_good(g)


async def test_streams_over_the_advertised_limit_are_refused_then_a_connection_error(backend: Backend) -> None:
    streams = b"".join(h2.frame(h2.HEADERS, h2.END_HEADERS, sid, SINK) for sid in range(1, 13, 2))
    async with stingy_upstream() as stingy, balancer(backend, stingy, max_concurrent_streams=4) as b, \
            good_client(b) as g:
        async with attacker(b.ports[0]) as a:
            frames = await a.frames(until=lambda f: f[0] == h2.SETTINGS and not f[1] & h2.ACK)
            settings = {int.from_bytes(frames[-1][3][i:i + 2], "big"): int.from_bytes(frames[-1][3][i + 2:i + 6], "big")
                        for i in range(0, len(frames[-1][3]), 6)}
            assert settings[h2.S_MAX_CONCURRENT_STREAMS] == 4
            # before it acknowledged our SETTINGS, a client may not know the limit: the extra streams are refused
            await a.send(streams)
            frames = await a.frames(until=lambda f: f[0] == h2.RST_STREAM and f[2] == 11)
            assert rst_codes(frames) == {9: h2.REFUSED_STREAM, 11: h2.REFUSED_STREAM}
            assert goaway_code(frames) is None
        assert b.stats.events[("s", "routed")] == 4
        async with attacker(b.ports[0]) as a:
            # once it did, going over is a connection error: no stream beyond the limit starts a call
            await a.send(h2.frame(h2.SETTINGS, h2.ACK, 0) + streams)
            assert goaway_code(await a.frames(until=is_goaway)) == h2.PROTOCOL_ERROR
        assert b.stats.events[("s", "routed")] <= 8
    assert_good(g)


async def test_connections_over_the_limit_are_refused_and_the_good_client_keeps_its_own(backend: Backend) -> None:
    async with balancer(backend, max_connections=4) as b, good_client(b) as g:
        async with contextlib.AsyncExitStack() as stack:
            conns = [await stack.enter_async_context(attacker(b.ports[0])) for _ in range(6)]
            await until(lambda: len(b.proxy.connections) == 4, what="3 attackers and the good client admitted")
            codes = [goaway_code(await c.frames(until=is_goaway, timeout=0.5)) for c in conns]
            assert codes.count(h2.ENHANCE_YOUR_CALM) == 3 and codes.count(None) == 3
        await until(lambda: len(b.proxy.connections) == 1, what="attackers gone")
        # a new client connection is admitted again
        async with attacker(b.ports[0]) as a:
            assert goaway_code(await a.frames(until=is_goaway, timeout=0.3)) is None
    assert_good(g)


async def test_preface_and_idle_timeouts_close_connections_that_do_nothing(backend: Backend) -> None:
    async with balancer(backend, preface_timeout=0.3, idle_timeout=0.3) as b, good_client(b) as g:
        t0 = time.monotonic()
        async with attacker(b.ports[0], preface=False) as silent, attacker(b.ports[0], preface=False) as slow:
            await slow.send(h2.PREFACE[:10])  # a slowloris preface
            assert await silent.closed(timeout=5) and await slow.closed(timeout=5)
            assert time.monotonic() - t0 < 3
        async with attacker(b.ports[0]) as unacked:  # never acknowledges the balancer's SETTINGS
            assert goaway_code(await unacked.frames(until=is_goaway, timeout=5)) == h2.SETTINGS_TIMEOUT
        async with attacker(b.ports[0]) as idle:
            await idle.send(h2.frame(h2.SETTINGS, h2.ACK, 0))
            frames = await idle.frames(until=is_goaway, timeout=5)
            assert goaway_code(frames) == h2.NO_ERROR
            assert await idle.closed(timeout=10)
        # the good client's connection is busy (a call every 50 ms): never idle
        assert len(b.proxy.connections) == 1
    assert_good(g)


async def test_what_a_connection_holds_stays_within_its_buffer_limits(backend: Backend) -> None:
    # a client that keeps to its windows, on many streams whose upstream takes nothing: the balancer
    # holds at most connection_buffer_bytes of relayed bytes, and as much again of retry copies
    held = "/t.T/Held"
    block = encode(((b":method", b"POST"), (b":scheme", b"http"), (b":path", held.encode()), (b":authority", b"x"),
                    (b"content-type", b"application/grpc"), (b"te", b"trailers")))
    async with stingy_upstream() as stingy, \
            balancer(backend, stingy, stream_buffer_bytes=256 << 10, connection_buffer_bytes=1 << 20) as b, \
            good_client(b) as g, attacker(b.ports[0]) as a:
        b.proxy.unary_methods = b.proxy.unary_methods | {held.encode()}  # kept for retries
        conn = await connection_of(b, a)
        sids = list(range(1, 2 * 24, 2))
        window = {sid: 256 << 10 for sid in sids}  # the SETTINGS_INITIAL_WINDOW_SIZE it advertised
        first = await a.frames(until=lambda f: f[0] == h2.WINDOW_UPDATE and f[2] == 0)
        conn_window = 65535 + int.from_bytes(first[-1][3], "big")
        assert conn_window == 1 << 20
        await a.send(b"".join(h2.frame(h2.HEADERS, h2.END_HEADERS, sid, block if sid < 17 else SINK)
                              for sid in sids))
        for _ in range(200):
            sid = next((s for s in sids if window[s] >= 16384), None)
            if sid is None or conn_window < 16384:
                frames = await a.frames(timeout=0.3)
                assert goaway_code(frames) is None
                for t, _, fsid, p in frames:
                    if t == h2.WINDOW_UPDATE:
                        if fsid:
                            window[fsid] += int.from_bytes(p, "big")
                        else:
                            conn_window += int.from_bytes(p, "big")
                if not [f for f in frames if f[0] == h2.WINDOW_UPDATE]:
                    break  # the balancer grants nothing more: it holds all it will hold
                continue
            await a.send(h2.frame(h2.DATA, 0, sid, b"\x00" * 16384))
            window[sid] -= 16384
            conn_window -= 16384
        relayed = sum(st.recv_held for st in conn.streams.values())
        assert 0 < relayed <= 1 << 20
        assert 0 < conn.retry_held <= 1 << 20
        assert conn.recv_window >= 0
        calls = [st.handler for st in conn.streams.values() if st.handler is not None]
        assert any(not c.retryable for c in calls if c.head.path == held.encode())  # over the budget: sent once
    assert_good(g)


async def test_finished_calls_and_closed_connections_leave_no_reference_cycle(backend: Backend) -> None:
    # a flood of requests must be freed by reference counting as each call ends, not at the next full
    # garbage collection (the 50 KB requests of an attacker would otherwise pile up in the heap)
    import gc

    from modelyard.balancer.call import Attempt, Call
    from modelyard.balancer.downstream import DownstreamConnection

    ours = (Call, Attempt, h2.Stream, DownstreamConnection)
    async with balancer(backend) as b:
        gc.collect()
        gc.disable()
        try:
            async with good_client(b, rate=200, min_calls=50) as g:
                for _ in range(3):  # connections that come and go, some with an error
                    async with attacker(b.ports[0]) as a:
                        await a.send(h2.frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, 1, UNARY)
                                     + h2.frame(h2.GOAWAY, 0, 0, b"\x00"))
                        await a.frames(until=is_goaway)
                        await a.closed()
            await until(lambda: b.proxy.in_flight == 0 and len(b.proxy.connections) == 0, what="all done")
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            cyclic = [type(o).__name__ for o in gc.garbage if isinstance(o, ours)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        assert not cyclic, cyclic
    assert_good(g, at_least=50)
