"""REST (HTTP/1.1 JSON inference) through the balancer vs direct and Envoy, in one run.

Two backends answer ``POST /v2/models/identity/infer`` with the identity model's JSON response: bare
HTTP/1.1 echoes by default (benchmarks/http_echo.py: the proxies are what is measured), or real
``modelyard serve --model identity`` replicas (``--backend serve``). Targets: direct (one backend),
``modelyard balance --rest-listen`` (round_robin, 1 worker), Envoy --concurrency 1 with HTTP/1.1
upstreams (ROUND_ROBIN, LEAST_REQUEST; envoy/bench-http1-template.yaml). Load: ``h2load --h1``,
c keep-alive connections with one request in flight each (no pipelining); the per-request log gives
p50/p99.

    flock /tmp/modelyard-bench.lock .venv/bin/python benchmarks/rest_balancer.py [--duration 3]
        [--concurrency 1,16,64] [--backend echo|serve] [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from envoy_proxy import envoy_cmd, envoy_config
from h2load import h2load_available, parse_h2load
from http_echo import REQUEST, http_echo_cmd
from report import percentiles, print_table, write_json

from modelyard.launcher import Process, free_port, modelyard_argv

PATH = "/v2/models/identity/infer"


def run_h1(port: int, body: Path, clients: int, duration: float, warmup: float, log: Path) -> dict[str, Any]:
    """h2load over HTTP/1.1: ``clients`` keep-alive connections, one request in flight on each."""
    args = ["h2load", "--h1", "-c", str(clients), "-m", "1", "-t", str(min(2, clients)), "-d", str(body),
            "-H", "content-type: application/json", "-D", f"{int(duration * 1000)}ms",
            "--warm-up-time", f"{int(warmup * 1000)}ms", f"--log-file={log}", f"http://127.0.0.1:{port}{PATH}"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    res = parse_h2load(out.stdout)
    if log.exists():
        lat = [int(line.split("\t")[2]) / 1e3 for line in log.read_text().splitlines() if line.count("\t") >= 2]
        res.update(percentiles(lat))
        log.unlink()
    if not res.get("rps"):
        res["error"] = (out.stdout + out.stderr)[-500:]
    return res


def modelyard_cmd(rest_port: int, backends: list[int]) -> list[str]:
    eps = ",".join(f"127.0.0.1:{p}" for p in backends)
    return modelyard_argv("balance", "--listen", f"127.0.0.1:{free_port()}", "--no-admin", "--rest-listen",
                          f"127.0.0.1:{rest_port}", "--endpoints", eps, "--http-endpoints", eps,
                          "--picker", "round_robin", "--no-health-check", "--log-level", "WARNING")


def measure(name: str, port: int, body: Path, levels: list[int], duration: float, tmp: Path) -> list[dict[str, Any]]:
    run_h1(port, body, 4, 0.5, 0.1, tmp / "warm.log")  # warm connections and caches
    rows = []
    for c in levels:
        r = run_h1(port, body, c, duration, 0.5, tmp / f"{name}-{c}.log")
        rows.append({"target": name, "c": c, "rps": r["rps"], "p50_ms": r.get("p50"), "p99_ms": r.get("p99"),
                     "failed": r.get("failed", 0) + r.get("errored", 0),
                     "non_2xx": r.get("succeeded", 0) - r.get("status_2xx", r.get("succeeded", 0)),
                     **({"error": r["error"]} if "error" in r else {})})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per h2load point")
    ap.add_argument("--concurrency", default="1,16,64", help="comma-separated concurrency levels")
    ap.add_argument("--backend", choices=["echo", "serve"], default="echo")
    ap.add_argument("--quick", action="store_true", help="1 s points, c=1,64 only")
    a = ap.parse_args()
    if not h2load_available():
        print("h2load not found (apt-get install nghttp2-client); skipping", file=sys.stderr)
        return 0
    levels = [1, 64] if a.quick else [int(x) for x in a.concurrency.split(",")]
    duration = 1.0 if a.quick else a.duration
    tmp = Path(tempfile.mkdtemp(prefix="bench-rest-"))
    body = tmp / "request.json"
    body.write_bytes(json.dumps(REQUEST).encode())
    rows: list[dict[str, Any]] = []
    backend_procs: list[Process] = []
    try:
        ports: list[int] = []
        for i in range(2):
            if a.backend == "echo":
                port = free_port()
                proc = Process(http_echo_cmd(port), ready=port, name=f"echo{i}")
            else:
                port = free_port()
                proc = Process(modelyard_argv("serve", "--grpc-port", str(free_port()), "--http-port", str(port),
                                              "--model", "identity", "--log-level", "warning"),
                               ready=port, name=f"serve{i}")
            proc.start()
            backend_procs.append(proc)
            ports.append(port)
        rows += measure("direct", ports[0], body, levels, duration, tmp)
        port = free_port()
        with Process(modelyard_cmd(port, ports), ready=port, name="balance"):
            rows += measure("modelyard", port, body, levels, duration, tmp)
        for policy in ("ROUND_ROBIN", "LEAST_REQUEST"):
            port, admin = free_port(), free_port()
            cfg = envoy_config(port, admin, policy, ports, tmp / f"envoy-{policy}.yaml", "bench-http1-template.yaml")
            with Process(envoy_cmd(cfg), ready=port, name=f"envoy-{policy}"):
                rows += measure(f"envoy_{policy.lower()}", port, body, levels, duration, tmp)
    finally:
        for p in backend_procs:
            p.stop(5)
    print_table(rows, ["target", "c", "rps", "p50_ms", "p99_ms", "failed", "non_2xx"],
                f"HTTP/1.1 JSON inference through each target (h2load --h1, backends: {a.backend})")
    by = {(r["target"], r["c"]): r for r in rows}
    c_ratio = 64 if 64 in levels else levels[-1]
    summary: dict[str, Any] = {}
    for env in ("envoy_round_robin", "envoy_least_request"):
        e = by.get((env, c_ratio), {}).get("rps") or 0.0
        summary[f"modelyard_vs_{env}_rps_c{c_ratio}"] = by[("modelyard", c_ratio)]["rps"] / e if e else None
    if 1 in levels:
        for target in ("modelyard", "envoy_round_robin", "envoy_least_request"):
            p, d = by[(target, 1)].get("p50_ms"), by[("direct", 1)].get("p50_ms")
            summary[f"{target}_added_p50_c1_ms"] = p - d if p is not None and d is not None else None
    print(f"\nsummary (target: modelyard >= 0.6x Envoy RPS at c={c_ratio})")
    for k, v in summary.items():
        print(f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}")
    path = write_json(f"rest_balancer{'' if a.backend == 'echo' else '_serve'}",
                      {"path": PATH, "backend": a.backend, "payload_bytes": body.stat().st_size,
                       "duration_s": duration, "rows": rows, "summary": summary})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
