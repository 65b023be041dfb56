"""The balancer's data plane against in-test gRPC backends (same event loop) and subprocess echoes."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from modelyard.balancer.app import Balancer
from modelyard.balancer.config import config_from_dict
from modelyard.launcher import Process, free_port
from modelyard.launcher import until as launcher_until

ROOT = Path(__file__).resolve().parents[2]
ECHO = ROOT / "benchmarks" / "echo.py"


class Backend:
    """An in-process test service covering all four call kinds, metadata, trailers, errors, deadlines."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.calls = 0
        #: when set, unary calls are never answered (a hung process)
        self.hang = False
        self.health = health.aio.HealthServicer()

    async def start(self) -> None:
        name = self.name

        async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            self.calls += 1
            if self.hang:
                await asyncio.sleep(3600)
            md = dict(context.invocation_metadata())
            await context.send_initial_metadata((("x-backend", name),))
            context.set_trailing_metadata((("x-echo", md.get("x-test", "")),))
            if request == b"fail":
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad request",
                                    (("x-why", "because"),))
            if request == b"deadline":
                return f"{context.time_remaining():.3f}".encode()
            if request.startswith(b"sleep"):
                await asyncio.sleep(float(request[5:]))
            return request

        async def server_stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            for i in range(3):
                yield request + str(i).encode()

        async def client_stream(it: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
            return b"".join([m async for m in it])

        async def bidi(it: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            async for m in it:
                if m == b"boom":
                    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "boom")
                yield name.encode() + b":" + m

        handlers = grpc.method_handlers_generic_handler("t.T", {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        })
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers((handlers,))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)


@contextlib.asynccontextmanager
async def balancer(pools: dict[str, Any], **extra: Any) -> AsyncIterator[Balancer]:
    cfg = config_from_dict({
        "listeners": [{"address": "127.0.0.1:0"}],
        "admin": {"address": "127.0.0.1:0"},
        "unary_methods": ["/t.T/Unary"],
        "pools": pools,
        **extra,
    })
    async with Balancer(cfg) as b:
        yield b


def pool_of(*addresses: str, **kw: Any) -> dict[str, Any]:
    return {"picker": "round_robin", "endpoints": {"static": list(addresses)},
            "health_check": {"interval": 0.1, "timeout": 0.5}, **kw}


@contextlib.asynccontextmanager
async def channel(b: Balancer) -> AsyncIterator[grpc.aio.Channel]:
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{b.ports[0]}")
    try:
        yield ch
    finally:
        await ch.close()


until = partial(launcher_until, timeout=10.0, interval=0.02)


@pytest.fixture
async def backends() -> AsyncIterator[list[Backend]]:
    bs = [Backend("a"), Backend("b")]
    for b in bs:
        await b.start()
    yield bs
    for b in bs:
        await b.stop()


async def test_unary_forwards_bytes_metadata_headers_trailers_and_errors(backends: list[Backend]) -> None:
    async with balancer({"p": pool_of(backends[0].address)}) as b, channel(b) as ch:
        call = ch.unary_unary("/t.T/Unary")(b"\x00hello\xff", metadata=(("x-test", "v1"),))
        assert await call == b"\x00hello\xff"
        assert ("x-backend", "a") in tuple(await call.initial_metadata())
        assert ("x-echo", "v1") in tuple(await call.trailing_metadata())
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ch.unary_unary("/t.T/Unary")(b"fail")
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == "bad request"
        assert ("x-why", "because") in tuple(info.value.trailing_metadata())


async def test_all_four_call_kinds_are_proxied(backends: list[Backend]) -> None:
    async with balancer({"p": pool_of(backends[0].address)}) as b, channel(b) as ch:
        assert [m async for m in ch.unary_stream("/t.T/ServerStream")(b"x")] == [b"x0", b"x1", b"x2"]

        async def gen() -> AsyncIterator[bytes]:
            for part in (b"ab", b"cd", b"ef"):
                yield part
        assert await ch.stream_unary("/t.T/ClientStream")(gen()) == b"abcdef"
        call = ch.stream_stream("/t.T/Bidi")()
        for m in (b"1", b"2"):
            await call.write(m)
            assert await call.read() == b"a:" + m
        await call.write(b"boom")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
        assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION


async def test_remaining_deadline_reaches_the_upstream(backends: list[Backend]) -> None:
    async with balancer({"p": pool_of(backends[0].address)}) as b, channel(b) as ch:
        remaining = float(await ch.unary_unary("/t.T/Unary")(b"deadline", timeout=2.0))
        assert 0 < remaining <= 2.05  # grpc-timeout is sent rounded up to its unit
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ch.unary_unary("/t.T/Unary")(b"sleep5", timeout=0.3)
        assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


async def test_pool_timeout_caps_the_deadline(backends: list[Backend]) -> None:
    async with balancer({"p": pool_of(backends[0].address, timeout=0.2)}) as b, channel(b) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ch.unary_unary("/t.T/Unary")(b"sleep5", timeout=10)
        assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


async def test_no_healthy_endpoint_is_unavailable_naming_the_pool(backends: list[Backend]) -> None:
    async with balancer({"textpool": pool_of(backends[0].address, panic_threshold=0)}) as b, channel(b) as ch:
        await backends[0].health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        pool = b.pools["textpool"]
        await until(lambda: len(pool.snapshot) == 0, what="endpoint marked unhealthy")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ch.unary_unary("/t.T/Unary")(b"x")
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "textpool" in info.value.details()
        await backends[0].health.set("", health_pb2.HealthCheckResponse.SERVING)
        await until(lambda: len(pool.snapshot) == 1, what="endpoint healthy again")
        assert await ch.unary_unary("/t.T/Unary")(b"x") == b"x"


async def test_retry_moves_to_another_endpoint_when_one_refuses(backends: list[Backend]) -> None:
    dead = f"127.0.0.1:{free_port()}"
    pools = {"p": pool_of(dead, backends[0].address, health_check={"enabled": False})}
    async with balancer(pools) as b, channel(b) as ch:
        call = ch.unary_unary("/t.T/Unary")
        for _ in range(20):
            assert await call(b"x", timeout=5) == b"x"
        events = b.stats.events
        assert events[("p", "retries")] >= 1 or events[("p", "ejections")] >= 1


async def test_circuit_breaker_fails_fast_with_resource_exhausted(backends: list[Backend]) -> None:
    pools = {"p": pool_of(backends[0].address, circuit_breakers={"max_requests": 1})}
    async with balancer(pools) as b, channel(b) as ch:
        slow = asyncio.ensure_future(ch.unary_unary("/t.T/Unary")(b"sleep0.5"))
        await until(lambda: b.pools["p"].active == 1, what="first request in flight")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ch.unary_unary("/t.T/Unary")(b"x")
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await slow == b"sleep0.5"
        assert b.stats.events[("p", "circuit_open_requests")] == 1


async def test_routes_split_traffic_between_pools(backends: list[Backend]) -> None:
    pools = {"blue": pool_of(backends[0].address), "green": pool_of(backends[1].address)}
    routes = [{"match": {"method": "Bidi"}, "pool": "green"},
              {"match": {}, "split": [{"pool": "blue", "weight": 1}, {"pool": "green", "weight": 1}]}]
    async with balancer(pools, routes=routes) as b, channel(b) as ch:
        seen = set()
        for _ in range(40):
            call = ch.unary_unary("/t.T/Unary")(b"x")
            await call
            seen.add(dict(await call.initial_metadata())["x-backend"])
        assert seen == {"a", "b"}
        call = ch.stream_stream("/t.T/Bidi")()
        await call.write(b"m")
        assert await call.read() == b"b:m"
        await call.done_writing()


async def test_admin_api_adds_drains_and_removes_endpoints(backends: list[Backend]) -> None:
    async with balancer({"p": pool_of(backends[0].address)}) as b, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{b.admin_port}"
        pool = b.pools["p"]
        r = await http.post(f"{base}/endpoints", json={"pool": "p", "address": backends[1].address})
        assert r.status == 200
        assert len(pool.snapshot) == 2
        r = await http.post(f"{base}/endpoints/drain", json={"pool": "p", "address": backends[0].address})
        assert r.status == 200
        async with channel(b) as ch:
            for _ in range(5):
                call = ch.unary_unary("/t.T/Unary")(b"x")
                await call
                assert dict(await call.initial_metadata())["x-backend"] == "b"
        rows = (await (await http.get(f"{base}/endpoints")).json())["endpoints"]
        assert {r["address"]: r["draining"] for r in rows} == {backends[0].address: True, backends[1].address: False}
        r = await http.delete(f"{base}/endpoints", json={"pool": "p", "address": backends[0].address})
        assert r.status == 200 and list(pool.endpoints) == [backends[1].address]
        r = await http.post(f"{base}/endpoints", json={"pool": "nope", "address": "x:1"})
        assert r.status == 404
        metrics = await (await http.get(f"{base}/metrics")).text()
        assert 'modelyard_balancer_requests_total{code="OK",endpoint="' in metrics
        assert "modelyard_balancer_request_duration_seconds_bucket" in metrics
        assert (await http.get(f"{base}/config")).status == 200
        assert (await http.get(f"{base}/healthz")).status == 200
        r = await http.post(f"{base}/drain")
        assert r.status == 202
        assert (await http.get(f"{base}/healthz")).status == 503
        await asyncio.wait_for(b.wait(), 10)


async def test_draining_balancer_reports_not_serving(backends: list[Backend]) -> None:
    async with balancer({"p": pool_of(backends[0].address)}, drain={"delay": 0.5, "grace": 1}) as b, \
            channel(b) as ch:
        check = health_pb2_grpc.HealthStub(ch).Check
        assert (await check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING
        b.begin_drain()
        resp = await check(health_pb2.HealthCheckRequest())
        assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
        await asyncio.wait_for(b.wait(), 10)


async def test_garbage_and_non_grpc_requests_are_rejected_and_serving_continues(backends: list[Backend]) -> None:
    async with balancer({"p": pool_of(backends[0].address)}) as b, channel(b) as ch:
        port = b.ports[0]
        for junk in (b"\x00\x01\x02garbage" * 100, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                     b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\xff" * 64):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(junk)
            await writer.drain()
            with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
                await asyncio.wait_for(reader.read(1024), 2)
            writer.close()
        async with aiohttp.ClientSession() as http:
            with contextlib.suppress(aiohttp.ClientError):
                r = await http.post(f"http://127.0.0.1:{port}/t.T/Unary", data=b"x")
                assert r.status != 200
        assert await ch.unary_unary("/t.T/Unary")(b"still ok", timeout=5) == b"still ok"


async def test_upstream_reset_mid_stream_gives_unavailable_not_a_hang() -> None:
    echo = Process([sys.executable, str(ECHO), "serve", "--port", "0", "--delay-ms", "60000"], name="echo")
    with echo:
        assert echo.endpoints is not None
        async with balancer({"p": pool_of(echo.endpoints.grpc, health_check={"enabled": False})}) as b, \
                channel(b) as ch:
            call = ch.stream_stream("/bench.Echo/Stream")()
            await call.write(b"hello")
            await until(lambda: b.pools["p"].active == 1, what="stream in flight")
            echo.signal(signal.SIGKILL)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await asyncio.wait_for(call.read(), 10)
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_large_messages_and_long_streams_cross_flow_control_windows(backends: list[Backend]) -> None:
    big = bytes(range(256)) * (12 * 1024)  # 3 MiB: over our 1 MiB stream window and grpc's 64 KiB default
    opts = [("grpc.max_send_message_length", 8 << 20), ("grpc.max_receive_message_length", 8 << 20)]
    async with balancer({"p": pool_of(backends[0].address)}) as b:
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{b.ports[0]}", options=opts)
        try:
            assert await ch.unary_unary("/t.T/Unary")(big, timeout=30) == big
            call = ch.stream_stream("/t.T/Bidi")()
            chunk = b"z" * 16384
            for i in range(200):  # 3 MiB each way, one message at a time
                await call.write(chunk + str(i).encode())
                assert await call.read() == b"a:" + chunk + str(i).encode()
            await call.done_writing()
            assert await call.code() is grpc.StatusCode.OK
            many = await asyncio.gather(*(ch.unary_unary("/t.T/Unary")(bytes([i]) * 70000, timeout=30)
                                          for i in range(100)))
            assert many == [bytes([i]) * 70000 for i in range(100)]
        finally:
            await ch.close()
        pool = b.pools["p"]
        await until(lambda: pool.active == 0 and all(e.outstanding == 0 for e in pool.endpoints.values()),
                    what="all calls accounted")
        up = pool.endpoints[backends[0].address].upstream
        await until(lambda: all(not c.streams for c in up.conns), what="upstream streams closed")


async def _h2_exchange(port: int, payload: bytes, until_frame: Any) -> list[tuple[int, int, int, bytes]]:
    """Send raw bytes after the preface; collect frames until ``until_frame(frame)`` or EOF."""
    from modelyard.balancer.h2 import connection as h2

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(h2.PREFACE + h2.settings_frame({}) + payload)
    frames: list[tuple[int, int, int, bytes]] = []
    buf = b""
    try:
        while True:
            data = await asyncio.wait_for(reader.read(65536), 5)
            if not data:
                return frames
            buf += data
            while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
                n = int.from_bytes(buf[:3], "big")
                f = (buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF, buf[9:9 + n])
                buf = buf[9 + n:]
                frames.append(f)
                if until_frame(f):
                    return frames
    finally:
        writer.close()


async def test_raw_http2_non_grpc_requests_get_http_errors_and_bad_hpack_a_goaway(backends: list[Backend]) -> None:
    from modelyard.balancer.h2 import connection as h2
    from modelyard.balancer.h2.hpack import Decoder, encode

    get = encode(((b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"x")))
    text = encode(((b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/t.T/Unary"),
                   (b"content-type", b"text/plain")))
    flags = h2.END_HEADERS | h2.END_STREAM
    async with balancer({"p": pool_of(backends[0].address)}) as b, channel(b) as ch:
        port = b.ports[0]
        frames = await _h2_exchange(port, h2.frame(h2.HEADERS, flags, 1, get) + h2.frame(h2.HEADERS, flags, 3, text),
                                    lambda f: f[0] == h2.HEADERS and f[2] == 3)
        dec = Decoder()
        status = {f[2]: dict(dec.decode(f[3]))[b":status"] for f in frames if f[0] == h2.HEADERS}
        assert status == {1: b"405", 3: b"415"}
        frames = await _h2_exchange(port, h2.frame(h2.HEADERS, flags, 1, b"\xff\xff\xff\xff\xff"),
                                    lambda f: f[0] == h2.GOAWAY)
        goaway = [f for f in frames if f[0] == h2.GOAWAY]
        assert goaway and int.from_bytes(goaway[0][3][4:8], "big") == h2.COMPRESSION_ERROR
        assert await ch.unary_unary("/t.T/Unary")(b"still ok", timeout=5) == b"still ok"


async def test_an_endpoint_that_never_accepts_fails_over_after_the_connect_timeout(backends: list[Backend]) -> None:
    # a listener whose accept queue is full drops further SYNs, like a dead pod IP
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(0)
    port = lst.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        fillers.append(s)
    pools = {"p": pool_of(f"127.0.0.1:{port}", backends[0].address, health_check={"enabled": False},
                          connect_timeout=1.0)}
    try:
        async with balancer(pools) as b, channel(b) as ch:
            res = await asyncio.gather(*(ch.unary_unary("/t.T/Unary")(b"x", timeout=5) for _ in range(20)))
            assert res == [b"x"] * 20
            pool = b.pools["p"]
            await until(lambda: pool.active == 0 and pool.pending == 0, what="counters back to 0")
    finally:
        for s in [*fillers, lst]:
            s.close()


async def test_admin_refuses_an_address_with_a_bad_port(backends: list[Backend]) -> None:
    async with balancer({"p": pool_of(backends[0].address)}) as b, aiohttp.ClientSession() as http:
        r = await http.post(f"http://127.0.0.1:{b.admin_port}/endpoints", json={"pool": "p", "address": "127.0.0.1:99999"})
        assert r.status == 400


async def test_late_headers_on_an_ended_stream_do_not_kill_the_connection(backends: list[Backend]) -> None:
    from modelyard.balancer.h2 import connection as h2
    from modelyard.balancer.h2.hpack import encode

    text = encode(((b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/t.T/Unary"),
                   (b"content-type", b"text/plain")))
    grpc_req = encode(((b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/t.T/Unary"),
                       (b"content-type", b"application/grpc"), (b"te", b"trailers")))  # no :authority
    flags = h2.END_HEADERS
    async with balancer({"p": pool_of(backends[0].address)}) as b:
        # stream 1 is refused (415) and reset; the client's late trailers on it must be ignored,
        # and the gRPC call on stream 3 of the same connection must still complete (it has no
        # :authority: the proxy supplies one, which grpc servers require)
        frames = await _h2_exchange(
            b.ports[0],
            h2.frame(h2.HEADERS, flags, 1, text) + h2.frame(h2.HEADERS, flags | h2.END_STREAM, 1, encode(((b"x", b"1"),)))
            + h2.frame(h2.HEADERS, flags, 3, grpc_req) + h2.frame(h2.DATA, h2.END_STREAM, 3, b"\x00\x00\x00\x00\x02ok"),
            lambda f: f[0] == h2.GOAWAY or (f[0] == h2.HEADERS and f[2] == 3 and f[1] & h2.END_STREAM))
        assert not [f for f in frames if f[0] == h2.GOAWAY]
        assert b"ok" in b"".join(f[3] for f in frames if f[0] == h2.DATA and f[2] == 3)


async def test_a_peer_that_accepts_tcp_but_never_speaks_http2_fails_over_with_big_requests(
        backends: list[Backend]) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass  # reads, never answers: no SETTINGS, no WINDOW_UPDATE
        writer.close()

    srv = await asyncio.start_server(silent, "127.0.0.1", 0)
    bad = f"127.0.0.1:{srv.sockets[0].getsockname()[1]}"
    pools = {"p": pool_of(bad, backends[0].address, health_check={"enabled": False}, connect_timeout=1.0)}
    big = b"x" * (3 << 20)  # over the first attempt's window: the replay must not wait for window credit
    try:
        async with balancer(pools) as b:
            ch = grpc.aio.insecure_channel(f"127.0.0.1:{b.ports[0]}", options=[
                ("grpc.max_send_message_length", 8 << 20), ("grpc.max_receive_message_length", 8 << 20)])
            try:
                for _ in range(4):
                    assert await ch.unary_unary("/t.T/Unary")(big, timeout=10) == big
            finally:
                await ch.close()
            assert b.stats.events[("p", "retries")] >= 1
    finally:
        srv.close()


# ------------------------------------------------------------------ scale from zero (activator)


async def test_a_pool_with_no_endpoint_holds_requests_until_one_is_added(backends: list[Backend]) -> None:
    pools = {"p": pool_of(health_check={"enabled": False}, activator={"enabled": True, "timeout": 10})}
    async with balancer(pools) as b, channel(b) as ch, aiohttp.ClientSession() as http:
        admin = f"http://127.0.0.1:{b.admin_port}"
        call = ch.unary_unary("/t.T/Unary")
        calls = [asyncio.ensure_future(call(b"held %d" % i, timeout=10)) for i in range(3)]
        # the demand long-poll answers as soon as a request is held
        async with http.get(f"{admin}/pools/p/demand?wait=10") as r:
            body = await r.json()
        assert body["held"] >= 1 and body["endpoints"] == 0
        await until(lambda: b.held("p") == 3, what="three held requests")
        async with http.get(f"{admin}/metrics") as r:
            assert 'modelyard_balancer_held_requests{pool="p"} 3.0' in await r.text()
        async with http.post(f"{admin}/endpoints", json={"pool": "p", "address": backends[0].address}) as r:
            assert r.status == 200
        assert sorted(await asyncio.gather(*calls)) == [b"held 0", b"held 1", b"held 2"]
        assert b.held("p") == 0


async def test_held_requests_are_bounded_in_count_and_time() -> None:
    pools = {"p": pool_of(health_check={"enabled": False},
                          activator={"enabled": True, "max_requests": 2, "timeout": 0.5})}
    async with balancer(pools) as b, channel(b) as ch:
        call = ch.unary_unary("/t.T/Unary")
        held = [asyncio.ensure_future(call(b"x", timeout=10)) for _ in range(2)]
        await until(lambda: b.held("p") == 2, what="two held requests")
        with pytest.raises(grpc.aio.AioRpcError) as over:
            await call(b"x", timeout=10)
        assert over.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and "activator" in over.value.details()
        for fut in held:
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await fut
            assert late.value.code() is grpc.StatusCode.UNAVAILABLE and "no replica became ready" in late.value.details()
        assert b.held("p") == 0


async def test_a_cancelled_held_request_is_forgotten() -> None:
    pools = {"p": pool_of(health_check={"enabled": False}, activator={"enabled": True, "timeout": 30})}
    async with balancer(pools) as b, channel(b) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ch.unary_unary("/t.T/Unary")(b"x", timeout=0.3)
        assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        await until(lambda: b.held("p") == 0, what="the held request to be forgotten")


async def test_without_the_activator_an_empty_pool_fails_fast() -> None:
    async with balancer({"p": pool_of(health_check={"enabled": False})}) as b, channel(b) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ch.unary_unary("/t.T/Unary")(b"x", timeout=5)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE


# ------------------------------------------------------------------ per-try timeouts and hedging


HEDGED = {"unary_methods": ["/t.T/Unary"], "idempotent_methods": ["/t.T/Unary"]}


async def test_a_hung_endpoint_costs_a_per_try_timeout_not_the_deadline(backends: list[Backend]) -> None:
    backends[0].hang = True
    pools = {"p": pool_of(backends[0].address, backends[1].address, health_check={"enabled": False},
                          hedge={"min_per_try": 0.05, "initial_per_try": 0.1})}
    async with balancer(pools, **{k: v for k, v in HEDGED.items() if k != "unary_methods"}) as b, channel(b) as ch:
        call = ch.unary_unary("/t.T/Unary")
        for i in range(20):
            t0 = time.monotonic()
            assert await call(b"h%d" % i, timeout=5) == b"h%d" % i
            assert time.monotonic() - t0 < 1.0  # a per-try timeout, never the 5 s deadline
        ev = b.stats.events
        assert ev[("p", "hedges")] >= 1 and ev[("p", "per_try_timeouts")] >= 1
        assert ev[("p", "ejections")] >= 1  # the hedges' losses are failures: the hung endpoint is ejected
        hung = b.pools["p"].endpoints[backends[0].address]
        await until(lambda: hung.outstanding == 0, what="the hung attempts to be cancelled")


async def test_a_call_that_is_not_idempotent_is_never_hedged(backends: list[Backend]) -> None:
    backends[0].hang = True
    pools = {"p": pool_of(backends[0].address, health_check={"enabled": False},
                          hedge={"min_per_try": 0.05, "initial_per_try": 0.05})}
    async with balancer(pools) as b, channel(b) as ch:  # /t.T/Unary is unary, not declared idempotent
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ch.unary_unary("/t.T/Unary")(b"once", timeout=0.5)
        assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert backends[0].calls == 1
        assert b.stats.events[("p", "hedges")] == 0
