"""Throughput / latency of the balancer's data plane vs direct and Envoy, in one run.

Two bare echo backends (benchmarks/harness.py echo) answer ``/inference.GRPCInferenceService/ModelInfer``
with the request bytes. Targets: direct (one backend), modelyard balance (1 and 2 worker processes,
round_robin), Envoy --concurrency 1 (ROUND_ROBIN and LEAST_REQUEST). h2load posts a pre-framed ~100 B
gRPC message; concurrency c = connections x streams (connections = min(c, 8)). Added p50 at c=1 is measured
with a closed-loop grpc.aio client (h2load prints no percentiles).

    .venv/bin/python benchmarks/balancer.py [--duration 3] [--concurrency 1,16,64,256] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from echo import closed_loop, echo_server_cmd
from envoy_proxy import envoy_cmd, envoy_config
from h2load import h2load_available, run_h2load, write_frame_file
from report import percentiles, print_table, write_json

from modelyard.launcher import Process, free_port
from modelyard.protos import grpc_service_pb2 as pb

METHOD = "/inference.GRPCInferenceService/ModelInfer"


def payload() -> bytes:
    req = pb.ModelInferRequest(model_name="identity", id="bench")
    req.inputs.add(name="INPUT0", datatype="INT32", shape=[16])
    req.raw_input_contents.append(bytes(64))
    return req.SerializeToString()


def modelyard_cmd(port: int, backends: list[int], workers: int, picker: str = "round_robin") -> list[str]:
    return [sys.executable, "-m", "modelyard.clients.cli", "balance", "--listen", f"127.0.0.1:{port}", "--no-admin",
            "--endpoints", ",".join(f"127.0.0.1:{p}" for p in backends), "--picker", picker,
            "--workers", str(workers), "--log-level", "WARNING"]


def measure(name: str, port: int, frame: Path, levels: list[int], duration: float, body: bytes,
            p50_requests: int) -> list[dict[str, Any]]:
    rows = []
    # warm connections and caches
    run_h2load(port, METHOD, frame, clients=4, requests=400)
    for c in levels:
        conns = min(c, 8)
        r = run_h2load(port, METHOD, frame, clients=conns, streams=max(1, c // conns), duration=duration,
                         warmup=0.5, threads=2)
        rows.append({"target": name, "c": c, "rps": r["rps"], "mean_ms": r.get("mean_ms"), "max_ms": r.get("max_ms"),
                     "failed": r.get("failed", 0) + r.get("errored", 0), **({"error": r["error"]} if "error" in r else {})})
    cl = closed_loop(port, METHOD, body, concurrency=1, requests=p50_requests)
    pct = percentiles(cl["latencies_ms"])
    for row in rows:
        if row["c"] == 1:
            row["p50_c1_ms"] = pct["p50"]
            row["p99_c1_ms"] = pct["p99"]
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per h2load point")
    ap.add_argument("--concurrency", default="1,16,64,256", help="comma-separated concurrency levels")
    ap.add_argument("--p50-requests", type=int, default=2000, help="closed-loop requests for the c=1 p50")
    ap.add_argument("--workers", default="1,2", help="modelyard worker counts to measure")
    ap.add_argument("--quick", action="store_true", help="1 s points, c=1,64 only")
    a = ap.parse_args()
    if not h2load_available():
        print("h2load not found (apt-get install nghttp2-client); skipping", file=sys.stderr)
        return 0
    levels = [1, 64] if a.quick else [int(x) for x in a.concurrency.split(",")]
    duration = 1.0 if a.quick else a.duration
    body = payload()
    frame = write_frame_file(body)
    tmp = Path(tempfile.mkdtemp(prefix="bench-balancer-"))
    backends = [free_port(), free_port()]
    rows: list[dict[str, Any]] = []
    with Process(echo_server_cmd(backends[0]), ready=backends[0]), Process(echo_server_cmd(backends[1]), ready=backends[1]):
        rows += measure("direct", backends[0], frame, levels, duration, body, a.p50_requests)
        for w in [int(x) for x in a.workers.split(",")]:
            port = free_port()
            with Process(modelyard_cmd(port, backends, w), ready=port):
                rows += measure(f"modelyard_w{w}", port, frame, levels, duration, body, a.p50_requests)
        for policy in ("ROUND_ROBIN", "LEAST_REQUEST"):
            port, admin = free_port(), free_port()
            cfg = envoy_config(port, admin, policy, backends, tmp / f"envoy-{policy}.yaml")
            with Process(envoy_cmd(cfg), ready=port):
                rows += measure(f"envoy_{policy.lower()}", port, frame, levels, duration, body, a.p50_requests)
    print_table(rows, ["target", "c", "rps", "mean_ms", "max_ms", "failed", "p50_c1_ms", "p99_c1_ms"],
                  "gRPC unary echo through each target (h2load; p50/p99 at c=1 from a closed-loop client)")
    by = {(r["target"], r["c"]): r for r in rows}
    summary: dict[str, Any] = {}
    c_ratio = 64 if 64 in levels else levels[-1]
    for target in sorted({r["target"] for r in rows if r["target"].startswith("modelyard")}):
        for env in ("envoy_round_robin", "envoy_least_request"):
            e = by.get((env, c_ratio), {}).get("rps") or 0.0
            summary[f"{target}_vs_{env}_rps_c{c_ratio}"] = by[(target, c_ratio)]["rps"] / e if e else None
        if 1 in levels:
            summary[f"{target}_added_p50_c1_ms"] = by[(target, 1)]["p50_c1_ms"] - by[("direct", 1)]["p50_c1_ms"]
    for env in ("envoy_round_robin", "envoy_least_request"):
        if 1 in levels:
            summary[f"{env}_added_p50_c1_ms"] = by[(env, 1)]["p50_c1_ms"] - by[("direct", 1)]["p50_c1_ms"]
    print("\nsummary (targets: modelyard >= 0.6x Envoy RPS at c=64; added p50 at c=1 <= 0.3 ms)")
    for k, v in summary.items():
        print(f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}")
    path = write_json("balancer", {"method": METHOD, "payload_bytes": len(body), "duration_s": duration,
                                     "rows": rows, "summary": summary})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
