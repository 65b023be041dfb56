"""Routing quality: tail latency of each picker (and Envoy's policies) with one bad backend.

Scenarios, each with 3 echo backends behind the balancer and a closed-loop client at c=32 for a fixed
number of requests:
  slow:  one backend adds 50 ms to every request;
  stall: one backend stalls 2 s on 1% of its requests.
Baseline: a healthy 2-backend pool (round_robin). Reports p50/p99/p99.9 per policy, writes JSON and
latency-CDF PNGs to benchmarks/results/.

    .venv/bin/python benchmarks/routing_quality.py [--requests 4000] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h

METHOD = "/inference.GRPCInferenceService/ModelInfer"
BODY = b"\x0a\x08identity"
PICKERS = ["round_robin", "random", "least_conn", "peak_ewma"]
SCENARIOS = {
    "slow": {"delay_ms": 50.0, "stall_ms": 0.0, "stall_rate": 0.0},
    "stall": {"delay_ms": 0.0, "stall_ms": 2000.0, "stall_rate": 0.01},
}


def modelyard_cmd(port: int, backends: list[int], picker: str) -> list[str]:
    return [h.PY, "-m", "modelyard.clients.cli", "balance", "--listen", f"127.0.0.1:{port}", "--no-admin",
            "--endpoints", ",".join(f"127.0.0.1:{p}" for p in backends), "--picker", picker,
            "--log-level", "WARNING"]


def run_one(cmd: list[str], port: int, concurrency: int, requests: int) -> dict[str, Any]:
    with h.start(cmd, port):
        h.closed_loop(port, METHOD, BODY, concurrency=4, requests=200)  # warm up connections
        return h.closed_loop(port, METHOD, BODY, concurrency=concurrency, requests=requests)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--no-envoy", action="store_true")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    rows: list[dict[str, Any]] = []
    samples: dict[str, dict[str, list[float]]] = {}

    def record(scenario: str, policy: str, res: dict[str, Any]) -> None:
        pct = h.percentiles(res["latencies_ms"])
        rows.append({"scenario": scenario, "policy": policy, "ok": len(res["latencies_ms"]),
                     "errors": sum(res["errors"].values()), "rps": res["rps"], **pct})
        samples.setdefault(scenario, {})[policy] = res["latencies_ms"]

    good = [h.free_port() for _ in range(2)]
    with h.start(h.echo_server_cmd(good[0]), good[0]), h.start(h.echo_server_cmd(good[1]), good[1]):
        port = h.free_port()
        record("baseline", "healthy_2_round_robin",
               run_one(modelyard_cmd(port, good, "round_robin"), port, a.concurrency, a.requests))
        port = h.free_port()
        record("baseline", "healthy_2_peak_ewma",
               run_one(modelyard_cmd(port, good, "peak_ewma"), port, a.concurrency, a.requests))
        for scenario, bad in SCENARIOS.items():
            bad_port = h.free_port()
            with h.start(h.echo_server_cmd(bad_port, seed=7, **bad), bad_port):
                backends = [*good, bad_port]
                for picker in PICKERS:
                    port = h.free_port()
                    record(scenario, picker, run_one(modelyard_cmd(port, backends, picker), port,
                                                     a.concurrency, a.requests))
                if not a.no_envoy:
                    for policy in ("ROUND_ROBIN", "LEAST_REQUEST"):
                        port, admin = h.free_port(), h.free_port()
                        cfg = h.envoy_config(port, admin, policy, backends, tmp / f"envoy-{scenario}-{policy}.yaml")
                        record(scenario, f"envoy_{policy.lower()}",
                               run_one(h.envoy_cmd(cfg), port, a.concurrency, a.requests))
    h.print_table(rows, ["scenario", "policy", "ok", "errors", "rps", "p50", "p90", "p99", "p99.9"],
                  f"latency (ms), closed loop c={a.concurrency}, {a.requests} requests per policy")
    base = next(r for r in rows if r["policy"] == "healthy_2_round_robin")["p99"]
    summary: dict[str, Any] = {"baseline_p99_ms": base}
    for scenario in SCENARIOS:
        by = {r["policy"]: r for r in rows if r["scenario"] == scenario}
        pe = by["peak_ewma"]["p99"]
        summary[f"{scenario}_peak_ewma_p99_over_healthy_p99"] = pe / base
        if "envoy_least_request" in by:
            summary[f"{scenario}_peak_ewma_p99_over_envoy_least_request_p99"] = pe / by["envoy_least_request"]["p99"]
    print("\nsummary (targets: peak_ewma p99 <= 1.25x healthy 2-backend p99, <= 0.5x Envoy least_request)")
    for k, v in summary.items():
        print(f"  {k}: {v:.3f}")
    plot(samples)
    path = h.write_json("routing_quality", {"concurrency": a.concurrency, "requests": a.requests,
                                            "scenarios": SCENARIOS, "rows": rows, "summary": summary})
    print(f"wrote {path}")
    return 0


def plot(samples: dict[str, dict[str, list[float]]]) -> None:
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
        out = h.RESULTS / f"routing_quality_{scenario}.png"
        fig.savefig(out, dpi=100, bbox_inches="tight")
        plt.close(fig)
        print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
