"""Proxyless client vs through the balancer vs direct: RPS and latency at c=1/16/64, in one run.

Three ``modelyard serve`` replicas (demo identity model). Targets:
  direct     -- the client library against one replica;
  balancer   -- against ``modelyard balance`` (least_latency) in front of the three;
  proxyless  -- ``xds://<control plane>/pool``: the client gets the replicas from the balancer's xDS
                control plane and picks per request with the same picker, with no proxy hop.
The load is ``modelyard bench`` (closed loop, the asyncio client) in its own process.

    .venv/bin/python benchmarks/proxyless.py [--duration 4] [--concurrency 1,16,64]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import print_table, write_json

from modelyard.launcher import BalancerProcess, ServerProcess, modelyard_argv


def bench(url: str, c: int, duration: float) -> dict[str, Any]:
    out = subprocess.run(modelyard_argv("bench", "identity", "-i", "INPUT0=[1,2,3,4]", "--url", url, "-c", str(c),
                                        "--duration", str(duration), "--json"),
                         capture_output=True, text=True, timeout=120, check=True)
    return dict(json.loads(out.stdout))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=4.0, help="seconds per point")
    ap.add_argument("--concurrency", default="1,16,64", help="comma-separated concurrency levels")
    a = ap.parse_args()
    levels = [int(x) for x in a.concurrency.split(",")]
    replicas = [ServerProcess(["--log-level", "warning"]) for _ in range(3)]
    rows: list[dict[str, Any]] = []
    try:
        for r in replicas:
            r.start()
        cfg = {"listeners": [{"address": "127.0.0.1:0"}], "admin": {"address": "127.0.0.1:0"},
               "xds": {"address": "127.0.0.1:0"},
               "pools": {"p": {"picker": "least_latency", "endpoints": {"static": [r.grpc_url for r in replicas]}}}}
        with BalancerProcess(config=cfg, extra_args=["--log-level", "WARNING"]) as balancer:
            assert balancer.endpoints is not None
            targets = {"direct": replicas[0].grpc_url, "balancer": balancer.endpoints.grpc,
                       "proxyless": f"xds://{balancer.endpoints.fields['xds']}/p"}
            for name, url in targets.items():
                bench(url, 4, 1.0)  # warm up
                for c in levels:
                    r = bench(url, c, a.duration)
                    rows.append({"target": name, "c": c, "rps": r["rps"], "p50_ms": r["latency_ms"]["p50"],
                                 "p99_ms": r["latency_ms"]["p99"], "errors": r["errors"]})
    finally:
        for r in replicas:
            r.stop(timeout=5)
    print_table(rows, ["target", "c", "rps", "p50_ms", "p99_ms", "errors"],
                "identity through each target (modelyard bench, closed loop)")
    by = {(r["target"], r["c"]): r for r in rows}
    summary = {}
    for c in levels:
        summary[f"proxyless_over_balancer_rps_c{c}"] = by[("proxyless", c)]["rps"] / by[("balancer", c)]["rps"]
        summary[f"proxyless_over_direct_rps_c{c}"] = by[("proxyless", c)]["rps"] / by[("direct", c)]["rps"]
        summary[f"proxyless_minus_balancer_p50_ms_c{c}"] = by[("proxyless", c)]["p50_ms"] - by[("balancer", c)]["p50_ms"]
    for k, v in summary.items():
        print(f"  {k}: {v:.3f}")
    print(f"wrote {write_json('proxyless', {'rows': rows, 'summary': summary, 'duration_s': a.duration})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
