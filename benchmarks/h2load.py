"""Driving unary gRPC load with h2load (Debian ``nghttp2-client``): a pre-framed body, the summary parsed."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

from report import RESULTS

from modelyard.percentiles import percentiles


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
               stagger: bool = False, headers: tuple[str, ...] = (), tls: bool = False) -> dict[str, Any]:
    """Drive ``POST path`` over h2c with a pre-framed gRPC body; parse the summary.

    Each client is one HTTP/2 connection with ``streams`` concurrent streams (``-m``).
    With ``rps``, each client sends at most that many requests per second (``--rps``), so the
    offered load is bounded by ``clients * rps`` instead of by how fast the target answers.
    h2load starts every client at once, so their paced requests leave in bursts of ``clients``;
    ``stagger`` opens one connection every ``1 / (clients * rps)`` s instead (``-r 1 --rate-period``),
    which spreads the same load evenly, as independent clients would.
    With ``log_file``, h2load logs every request; p50/p90/p99/p99.9 and the samples (``latencies_ms``) are added.
    ``headers`` are extra ``name: value`` request headers (e.g. ``authorization: Bearer ...``); ``tls`` drives
    ``https://`` (h2 negotiated with ALPN; h2load does not verify the certificate).
    """
    args = ["h2load", "-c", str(clients), "-m", str(streams), "-t", str(min(threads, clients)),
            "-d", str(frame_file), "-H", "content-type: application/grpc", "-H", "te: trailers"]
    for header in headers:
        args += ["-H", header]
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
    args.append(f"{'https' if tls else 'http'}://127.0.0.1:{port}{path}")
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
