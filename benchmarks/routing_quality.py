"""Routing quality: tail latency of each picker (and Envoy's policies) with one bad backend.

Every echo backend takes a base service time (``--base-ms``, default 5 ms of asyncio.sleep, i.e. concurrent,
no queueing), so latency differences come from where requests are routed. Scenarios, each with 3 backends
behind the balancer:
  slow:  one backend adds 50 ms to every request;
  stall: one backend stalls 2 s on 1% of its requests.
Baseline: a healthy 2-backend pool (round_robin, and peak_ewma). Load: h2load with c=32 connections,
one stream each (at most 32 requests in flight), each paced to ``--rps-per-client`` (default 10, i.e.
~320 req/s offered), for ``--requests`` per policy. The clients' start times are staggered so that the
paced requests arrive evenly, as from independent clients; ``--burst`` keeps h2load's default of
starting every client at once, so that all 32 send in the same instant every 1/rps seconds (a harsh
case for peak EWMA: a burst of 32 makes ``rtt * (outstanding + 1)`` of the fast backends exceed the
slow one's, so a few requests of every burst go to the slow backend). An unpaced closed loop at c=32 over 5 ms backends
would offer ~6400 req/s, far more than the Python proxy plus three Python backends can serve on two
cores: latency is then CPU queueing (the old benchmark's healthy p50 was 21 ms), not routing.
Latencies are h2load's per-request times from its --log-file (send to end of response). Reports
p50/p99/p99.9 per policy, writes JSON and latency-CDF PNGs to benchmarks/results/.

    .venv/bin/python benchmarks/routing_quality.py [--requests 4000] [--concurrency 32] [--rps-per-client 10]
                                                   [--burst]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from echo import echo_server_cmd
from envoy_proxy import envoy_cmd, envoy_config
from h2load import h2load_available, run_h2load, write_frame_file
from report import RESULTS, percentiles, print_table, write_json

from modelyard.launcher import Process, free_port

METHOD = "/inference.GRPCInferenceService/ModelInfer"
BODY = b"\x0a\x08identity"
PICKERS = ["round_robin", "random", "least_conn", "peak_ewma"]
#: what the bad backend adds on top of the base service time
SCENARIOS = {
    "slow": {"delay_ms": 50.0, "stall_ms": 0.0, "stall_rate": 0.0},
    "stall": {"delay_ms": 0.0, "stall_ms": 2000.0, "stall_rate": 0.01},
}


def modelyard_cmd(port: int, backends: list[int], picker: str) -> list[str]:
    return [sys.executable, "-m", "modelyard.clients.cli", "balance", "--listen", f"127.0.0.1:{port}", "--no-admin",
            "--endpoints", ",".join(f"127.0.0.1:{p}" for p in backends), "--picker", picker,
            "--log-level", "WARNING"]


def run_one(cmd: list[str], port: int, a: argparse.Namespace, frame: Path, log: Path) -> dict[str, Any]:
    with Process(cmd, ready=port):
        run_h2load(port, METHOD, frame, clients=4, requests=200)  # warm up connections
        r = run_h2load(port, METHOD, frame, clients=a.concurrency, requests=a.requests, rps=a.rps_per_client,
                         log_file=log, timeout=300, stagger=not a.burst)
        return {"latencies_ms": r.get("latencies_ms", []), "rps": r["rps"],
                "errors": {"failed": r.get("failed", 0) + r.get("errored", 0)}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rps-per-client", type=int, default=10, help="h2load --rps per connection")
    ap.add_argument("--burst", action="store_true",
                    help="start all clients at once (synchronized bursts) instead of staggering them")
    ap.add_argument("--base-ms", type=float, default=5.0, help="every backend's service time (asyncio.sleep)")
    ap.add_argument("--no-envoy", action="store_true")
    a = ap.parse_args()
    if not h2load_available():
        print("h2load not found (apt-get install nghttp2-client); skipping", file=sys.stderr)
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    frame = write_frame_file(BODY, tmp / "frame.bin")
    log = tmp / "h2load.log"
    rows: list[dict[str, Any]] = []
    samples: dict[str, dict[str, list[float]]] = {}

    def record(scenario: str, policy: str, res: dict[str, Any]) -> None:
        pct = percentiles(res["latencies_ms"])
        rows.append({"scenario": scenario, "policy": policy, "ok": len(res["latencies_ms"]),
                     "errors": sum(res["errors"].values()), "rps": res["rps"], **pct})
        samples.setdefault(scenario, {})[policy] = res["latencies_ms"]

    good = [free_port() for _ in range(2)]
    base = a.base_ms
    with Process(echo_server_cmd(good[0], delay_ms=base), ready=good[0]), \
            Process(echo_server_cmd(good[1], delay_ms=base), ready=good[1]):
        port = free_port()
        record("baseline", "healthy_2_round_robin",
               run_one(modelyard_cmd(port, good, "round_robin"), port, a, frame, log))
        port = free_port()
        record("baseline", "healthy_2_peak_ewma",
               run_one(modelyard_cmd(port, good, "peak_ewma"), port, a, frame, log))
        for scenario, bad in SCENARIOS.items():
            bad_port = free_port()
            bad_args = {**bad, "delay_ms": base + bad["delay_ms"]}
            with Process(echo_server_cmd(bad_port, seed=7, **bad_args), ready=bad_port):
                backends = [*good, bad_port]
                for picker in PICKERS:
                    port = free_port()
                    record(scenario, picker, run_one(modelyard_cmd(port, backends, picker), port, a, frame, log))
                if not a.no_envoy:
                    for policy in ("ROUND_ROBIN", "LEAST_REQUEST"):
                        port, admin = free_port(), free_port()
                        cfg = envoy_config(port, admin, policy, backends, tmp / f"envoy-{scenario}-{policy}.yaml")
                        record(scenario, f"envoy_{policy.lower()}", run_one(envoy_cmd(cfg), port, a, frame, log))
    print_table(rows, ["scenario", "policy", "ok", "errors", "rps", "p50", "p90", "p99", "p99.9"],
                  f"latency (ms), h2load c={a.concurrency} x {a.rps_per_client} req/s, {a.requests} requests per "
                  f"policy, backends {base:g} ms")
    healthy = next(r for r in rows if r["policy"] == "healthy_2_round_robin")
    summary: dict[str, Any] = {"baseline_p99_ms": healthy["p99"], "baseline_p99.9_ms": healthy["p99.9"]}
    for scenario in SCENARIOS:
        by = {r["policy"]: r for r in rows if r["scenario"] == scenario}
        for q in ("p99", "p99.9"):
            pe = by["peak_ewma"][q]
            summary[f"{scenario}_peak_ewma_{q}_over_healthy_{q}"] = pe / healthy[q]
            if "envoy_least_request" in by:
                summary[f"{scenario}_peak_ewma_{q}_over_envoy_least_request_{q}"] = pe / by["envoy_least_request"][q]
    print("\nsummary (targets: peak_ewma p99 <= 1.25x healthy 2-backend p99, <= 0.5x Envoy least_request)")
    for k, v in summary.items():
        print(f"  {k}: {v:.3f}")
    plot(samples, "_burst" if a.burst else "")
    name = "routing_quality_burst" if a.burst else "routing_quality"
    path = write_json(name, {"concurrency": a.concurrency, "requests": a.requests, "burst": a.burst,
                                            "rps_per_client": a.rps_per_client, "base_ms": base,
                                            "scenarios": SCENARIOS, "rows": rows, "summary": summary})
    print(f"wrote {path}")
    return 0


def plot(samples: dict[str, dict[str, list[float]]], suffix: str = "") -> None:
    """One PNG per scenario: empirical latency CDF per policy, log-x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for scenario, by_policy in samples.items():
        fig, ax = plt.subplots(figsize=(8, 5))
        for policy, lat in by_policy.items():
            s = sorted(lat)
            if not s:
                continue
            ax.plot(s, [(i + 1) / len(s) for i in range(len(s))], label=policy)
        ax.set_xscale("log")
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0.5, 1.001)
        ax.set_title(f"routing quality: {scenario}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        out = RESULTS / f"routing_quality_{scenario}{suffix}.png"
        fig.savefig(out, dpi=100, bbox_inches="tight")
        plt.close(fig)
        print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
