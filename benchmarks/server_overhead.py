"""modelyard serve vs a bare grpc.aio echo server, same payload, same load generator (h2load).

    .venv/bin/python benchmarks/server_overhead.py [--duration 5] [--levels 1,16,64]

Both servers are started by this script. The payload is a ModelInferRequest for the
``identity`` model with a small FP32 tensor (1x16), sent as a pre-framed gRPC body;
the echo server returns the request bytes untouched, so the ratio modelyard/echo is
the cost of protobuf decode, validation, the worker-thread hop and the response encode.
Prints a table and writes benchmarks/results/server_overhead.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from echo import echo_server_cmd
from h2load import h2load_available, run_h2load, write_frame_file
from report import print_table, write_json

from modelyard.launcher import Process, free_port
from modelyard.protos import grpc_service_pb2 as pb
from modelyard.protos.tensors import to_raw

PATH = "/inference.GRPCInferenceService/ModelInfer"


def payload() -> bytes:
    x = np.arange(16, dtype=np.float32).reshape(1, 16)
    req = pb.ModelInferRequest(model_name="identity")
    req.inputs.add(name="INPUT0", datatype="FP32", shape=x.shape)
    req.raw_input_contents.append(to_raw(x))
    return req.SerializeToString()


def check_modelyard(port: int, body: bytes) -> None:
    """One real call first: h2load counts HTTP 200s, not grpc-status, so prove the request is valid."""
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        resp = pb.ModelInferResponse.FromString(ch.unary_unary(PATH)(body, timeout=10))
    assert resp.outputs[0].name == "OUTPUT0" and len(resp.raw_output_contents[0]) == 64


def shape(c: int) -> tuple[int, int]:
    """(connections, streams per connection) for total concurrency ``c``."""
    conns = min(c, 16)
    return conns, max(1, c // conns)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=3, help="seconds of measurement per run (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="h2load warm-up seconds per level (default 1)")
    ap.add_argument("--levels", default="1,16,64", help="concurrency levels (default 1,16,64)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="alternating rounds per level; medians are compared (default 3)")
    args = ap.parse_args()
    if not h2load_available():
        print("h2load not found: apt-get install nghttp2-client", file=sys.stderr)
        return 2
    levels = [int(x) for x in args.levels.split(",")]
    body = payload()
    frame = write_frame_file(body, Path(tempfile.mkdtemp()) / "frame.bin")
    echo_port, grpc_port, http_port = free_port(), free_port(), free_port()
    serve = [sys.executable, "-m", "modelyard.clients.cli", "serve", "--grpc-port", str(grpc_port),
             "--http-port", str(http_port), "--model", "identity", "--log-level", "warning"]
    rows = []
    with Process(echo_server_cmd(echo_port), ready=echo_port, name="echo"), \
            Process(serve, ready=grpc_port, name="modelyard"):
        check_modelyard(grpc_port, body)
        for c in levels:
            conns, streams = shape(c)
            runs: dict[str, list[dict]] = {"echo": [], "modelyard": []}
            # Alternate the two servers, several rounds: the machine's noise hits both alike,
            # and the median of each is compared.
            for _ in range(args.rounds):
                for name, port in (("echo", echo_port), ("modelyard", grpc_port)):
                    log = Path(tempfile.mkstemp(suffix=".h2load.log")[1])
                    r = run_h2load(port, PATH, frame, conns, streams=streams, duration=args.duration,
                                           warmup=args.warmup, log_file=log)
                    if r.get("error"):
                        print(f"{name} c={c}: h2load failed: {r['error']}", file=sys.stderr)
                    runs[name].append(r)
            row: dict = {"concurrency": c}
            for name, results in runs.items():
                row[f"{name}_rps"] = statistics.median(r["rps"] for r in results)
                row[f"{name}_p50_ms"] = statistics.median(r.get("p50") or 0.0 for r in results)
                row[f"{name}_p99_ms"] = statistics.median(r.get("p99") or 0.0 for r in results)
                row[f"{name}_rps_runs"] = [r["rps"] for r in results]
            row["rps_ratio"] = row["modelyard_rps"] / row["echo_rps"] if row["echo_rps"] else None
            row["p50_added_ms"] = row["modelyard_p50_ms"] - row["echo_p50_ms"]
            rows.append(row)
    cols = ["concurrency", "echo_rps", "modelyard_rps", "rps_ratio", "echo_p50_ms", "modelyard_p50_ms",
            "echo_p99_ms", "modelyard_p99_ms", "p50_added_ms"]
    print_table(rows, cols, "modelyard serve (identity, FP32 1x16) vs bare grpc.aio echo, h2load")
    path = write_json("server_overhead", {"rows": rows, "duration_s": args.duration, "rounds": args.rounds,
                                                   "payload_bytes": len(body)})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
