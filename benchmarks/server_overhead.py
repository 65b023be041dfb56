"""modelyard serve vs a bare grpc.aio echo server, same payload, same load generator (h2load).

    .venv/bin/python benchmarks/server_overhead.py [--duration 5] [--levels 1,16,64]
    .venv/bin/python benchmarks/server_overhead.py --variants modelyard,auth,tls,tls+auth \
        --reference-site /tmp/ref-site --name server_overhead_security

Both servers are started by this script. The payload is a ModelInferRequest for the
``identity`` model with a small FP32 tensor (1x16), sent as a pre-framed gRPC body;
the echo server returns the request bytes untouched, so the ratio modelyard/echo is
the cost of protobuf decode, validation, the worker-thread hop and the response encode.
Prints a table and writes benchmarks/results/server_overhead.json.

``--variants`` adds modelyard servers with security on, measured in the same alternating rounds:
``auth`` (a tokens file of 10 tokens; h2load sends ``authorization: Bearer``), ``tls`` (TLS 1.3,
certificates made by trustme; h2load over https with ALPN h2), ``tls+auth``. ``--reference-site DIR``
adds ``reference``: the same server from another build (``pip install --no-deps --target DIR <checkout>``),
to show what a change costs with everything off.
"""

from __future__ import annotations

import argparse
import json
import os
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


def check_modelyard(port: int, body: bytes, headers: tuple[str, ...] = (), ca: bytes | None = None) -> None:
    """One real call first: h2load counts HTTP 200s, not grpc-status, so prove the request is valid."""
    import grpc

    metadata = tuple(tuple(h.split(": ", 1)) for h in headers)
    target = f"127.0.0.1:{port}"
    with (grpc.secure_channel(target, grpc.ssl_channel_credentials(ca)) if ca else grpc.insecure_channel(target)) as ch:
        resp = pb.ModelInferResponse.FromString(ch.unary_unary(PATH)(body, timeout=10, metadata=metadata))
    assert resp.outputs[0].name == "OUTPUT0" and len(resp.raw_output_contents[0]) == 64


TOKEN = "bench-token-0123456789abcdef"


def security_files(directory: Path) -> dict[str, str]:
    """A certificate (trustme) and a tokens file of 10 tokens, the benchmark's one among them."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = {"cert": str(directory / "server.pem"), "key": str(directory / "server.key"),
             "tokens": str(directory / "tokens.json")}
    cert.cert_chain_pems[0].write_to_path(files["cert"])
    cert.private_key_pem.write_to_path(files["key"])
    tokens = {f"other-token-{i:02d}-0123456789": {"name": f"other{i}", "models": ["identity"]} for i in range(9)}
    tokens[TOKEN] = {"name": "bench", "models": ["identity"]}
    Path(files["tokens"]).write_text(json.dumps(tokens))
    return files


def variant_args(name: str, files: dict[str, str]) -> tuple[list[str], tuple[str, ...], bool]:
    """(serve flags, h2load headers, tls) of a variant."""
    args: list[str] = []
    headers: tuple[str, ...] = ()
    if "auth" in name:
        args += ["--auth-tokens", files["tokens"]]
        headers = (f"authorization: Bearer {TOKEN}",)
    if "tls" in name:
        args += ["--tls-cert", files["cert"], "--tls-key", files["key"]]
    return args, headers, "tls" in name


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
    ap.add_argument("--variants", default="modelyard",
                    help="modelyard servers to measure: modelyard, auth, tls, tls+auth (default modelyard)")
    ap.add_argument("--reference-site", metavar="DIR",
                    help="also measure 'reference': modelyard served from this install (PYTHONPATH=DIR)")
    ap.add_argument("--name", default="server_overhead", help="results file name (default server_overhead)")
    args = ap.parse_args()
    if not h2load_available():
        print("h2load not found: apt-get install nghttp2-client", file=sys.stderr)
        return 2
    levels = [int(x) for x in args.levels.split(",")]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.reference_site:
        variants.append("reference")
    body = payload()
    tmp = Path(tempfile.mkdtemp())
    frame = write_frame_file(body, tmp / "frame.bin")
    files = security_files(tmp) if any(v not in ("modelyard", "reference") for v in variants) else {}
    echo_port = free_port()
    servers = [Process(echo_server_cmd(echo_port), ready=echo_port, name="echo")]
    targets: dict[str, tuple[int, tuple[str, ...], bool]] = {"echo": (echo_port, (), False)}
    for v in variants:
        grpc_port, http_port = free_port(), free_port()
        extra, headers, tls = variant_args(v, files) if v not in ("modelyard", "reference") else ([], (), False)
        serve = [sys.executable, "-m", "modelyard.clients.cli", "serve", "--grpc-port", str(grpc_port),
                 "--http-port", str(http_port), "--model", "identity", "--log-level", "warning", *extra]
        env = {"PYTHONPATH": args.reference_site} if v == "reference" else None
        servers.append(Process(serve, ready=grpc_port, name=v, env=env))
        targets[v] = (grpc_port, headers, tls)
    rows = []
    try:
        for p in servers:
            p.start()
        for v in variants:
            port, headers, tls = targets[v]
            check_modelyard(port, body, headers, Path(files["cert"]).read_bytes() if tls else None)
        for c in levels:
            conns, streams = shape(c)
            runs: dict[str, list[dict]] = {name: [] for name in targets}
            # Alternate the servers, several rounds: the machine's noise hits all alike,
            # and the median of each is compared.
            for _ in range(args.rounds):
                for name, (port, headers, tls) in targets.items():
                    log = Path(tempfile.mkstemp(suffix=".h2load.log")[1])
                    r = run_h2load(port, PATH, frame, conns, streams=streams, duration=args.duration,
                                   warmup=args.warmup, log_file=log, headers=headers, tls=tls)
                    if r.get("error"):
                        print(f"{name} c={c}: h2load failed: {r['error']}", file=sys.stderr)
                    r.pop("latencies_ms", None)
                    runs[name].append(r)
            row: dict = {"concurrency": c}
            for name, results in runs.items():
                row[f"{name}_rps"] = statistics.median(r["rps"] for r in results)
                row[f"{name}_p50_ms"] = statistics.median(r.get("p50") or 0.0 for r in results)
                row[f"{name}_p99_ms"] = statistics.median(r.get("p99") or 0.0 for r in results)
                row[f"{name}_rps_runs"] = [r["rps"] for r in results]
            for v in variants:
                row[f"{v}_ratio"] = row[f"{v}_rps"] / row["echo_rps"] if row["echo_rps"] else None
            if "modelyard" in variants:
                row["rps_ratio"] = row["modelyard_ratio"]
                row["p50_added_ms"] = row["modelyard_p50_ms"] - row["echo_p50_ms"]
            rows.append(row)
    finally:
        for p in servers:
            p.stop()
    cols = ["concurrency", "echo_rps", *(f"{v}_rps" for v in variants), *(f"{v}_ratio" for v in variants),
            "echo_p50_ms", *(f"{v}_p50_ms" for v in variants)]
    print_table(rows, cols, "modelyard serve (identity, FP32 1x16) vs bare grpc.aio echo, h2load")
    path = write_json(args.name, {"rows": rows, "duration_s": args.duration, "rounds": args.rounds,
                                  "payload_bytes": len(body), "variants": variants,
                                  "reference_site": args.reference_site, "cpus": os.cpu_count()})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
