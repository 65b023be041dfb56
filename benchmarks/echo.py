"""The bare grpc.aio echo backend and a closed-loop client -- the baselines the benchmarks compare against.

    python benchmarks/echo.py serve --port P [--delay-ms D] [--stall-ms S --stall-rate R]
    python benchmarks/echo.py client --port P --concurrency C --requests N   (prints JSON)

``serve`` answers every method with the request bytes (unary and bidi), plus grpc.health.v1
SERVING, and prints the ``modelyard ready grpc=...`` line (``--port 0`` picks a free port).
``client`` measures per-request latency where h2load's histogram is too coarse.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modelyard.launcher import print_ready

PY = sys.executable
SCRIPT = str(Path(__file__).resolve())


def echo_server_cmd(port: int, delay_ms: float = 0.0, stall_ms: float = 0.0, stall_rate: float = 0.0,
                    seed: int = 0, cpu_ms: float = 0.0) -> list[str]:
    """Command line of the echo backend."""
    return [PY, SCRIPT, "serve", "--port", str(port), "--delay-ms", str(delay_ms),
            "--stall-ms", str(stall_ms), "--stall-rate", str(stall_rate), "--seed", str(seed),
            "--cpu-ms", str(cpu_ms)]


def spin(ms: float) -> None:
    """Burn ``ms`` of CPU on the event loop: requests queue behind each other, as on a CPU-bound server."""
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        pass


async def serve(port: int, delay_ms: float, stall_ms: float, stall_rate: float, seed: int,
                cpu_ms: float = 0.0) -> None:
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    rng = random.Random(seed)

    async def pause() -> None:
        if cpu_ms:
            spin(cpu_ms)
        d = delay_ms
        if stall_rate and rng.random() < stall_rate:
            d += stall_ms
        if d > 0:
            await asyncio.sleep(d / 1e3)

    async def unary(request: bytes, context: Any) -> bytes:
        await pause()
        return request

    async def bidi(request_iterator: Any, context: Any) -> Any:
        async for msg in request_iterator:
            await pause()
            yield msg

    class Echo(grpc.GenericRpcHandler):
        def __init__(self) -> None:
            self.u = grpc.unary_unary_rpc_method_handler(unary)
            self.s = grpc.stream_stream_rpc_method_handler(bidi)

        def service(self, details: Any) -> Any:
            if details.method.startswith(("/grpc.health.v1.", "/grpc.reflection.")):
                return None
            return self.s if "Stream" in details.method else self.u

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    hs = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    await hs.set("", health_pb2.HealthCheckResponse.SERVING)
    server.add_generic_rpc_handlers((Echo(),))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print_ready(grpc=f"127.0.0.1:{bound}")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


async def _closed_loop(port: int, method: str, payload: bytes, concurrency: int, requests: int,
                       timeout: float) -> dict[str, Any]:  # noqa: ASYNC109
    import grpc

    ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    call = ch.unary_unary(method)
    lat: list[float] = []
    errors: dict[str, int] = {}
    left = requests

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            t0 = time.perf_counter()
            try:
                await call(payload, timeout=timeout)
                lat.append((time.perf_counter() - t0) * 1e3)
            except grpc.aio.AioRpcError as e:
                errors[e.code().name] = errors.get(e.code().name, 0) + 1

    await ch.channel_ready()
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    await ch.close()
    return {"latencies_ms": lat, "errors": errors, "wall_s": wall, "rps": len(lat) / wall if wall else 0.0}


def closed_loop(port: int, method: str, payload: bytes, concurrency: int, requests: int,
                timeout: float = 30.0) -> dict[str, Any]:
    """Run the closed-loop client in a subprocess (its own core); returns latencies (ms), errors, rps."""
    out = subprocess.run([PY, SCRIPT, "client", "--port", str(port), "--method", method,
                          "--payload-hex", payload.hex(), "--concurrency", str(concurrency),
                          "--requests", str(requests), "--timeout", str(timeout)],
                         capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("serve", help="bare grpc.aio echo backend")
    e.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0 = any free port)")
    e.add_argument("--delay-ms", type=float, default=0.0, help="added to every response")
    e.add_argument("--stall-ms", type=float, default=0.0, help="added to a share --stall-rate of responses")
    e.add_argument("--stall-rate", type=float, default=0.0, help="share of responses that stall")
    e.add_argument("--seed", type=int, default=0, help="RNG seed of the stalls")
    e.add_argument("--cpu-ms", type=float, default=0.0,
                   help="CPU time burnt per request on the event loop (latency then grows with requests in flight)")
    c = sub.add_parser("client", help="closed-loop unary load generator; prints JSON")
    c.add_argument("--port", type=int, required=True, help="target port on 127.0.0.1")
    c.add_argument("--method", default="/bench.Echo/Unary", help="fully qualified method")
    c.add_argument("--payload-hex", default="", help="request message bytes, hex")
    c.add_argument("--concurrency", type=int, default=1, help="requests in flight")
    c.add_argument("--requests", type=int, default=1000, help="requests in all")
    c.add_argument("--timeout", type=float, default=30.0, help="per-request deadline (s)")
    a = ap.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if a.cmd == "serve":
        asyncio.run(serve(a.port, a.delay_ms, a.stall_ms, a.stall_rate, a.seed, a.cpu_ms))
    else:
        res = asyncio.run(_closed_loop(a.port, a.method, bytes.fromhex(a.payload_hex), a.concurrency,
                                       a.requests, a.timeout))
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
