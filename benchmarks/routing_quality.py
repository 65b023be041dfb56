"""Routing quality: tail latency and throughput of each picker (and Envoy's policies) with one bad backend,
under every load shape, quiet and with the CPU shared -- all in one run.

Three echo backends (benchmarks/echo.py) behind the balancer; one is bad:
  slow:  it adds 50 ms to every request;
  stall: it stalls 2 s on 1% of its requests.
Load shapes (h2load, c=32 connections with one stream each):
  staggered: each client paced to 10 req/s, starts staggered so requests arrive evenly (independent users);
  burst:     closed loop from a synchronized start: every client sends its next request the moment the
             last returns (what most load tools, and real bursts, do);
  cpu:       CPU-bound backends (each request burns ``--cpu-ms`` on the backend's only thread, so latency
             grows with requests in flight, like a real model server), paced clients (8 req/s each).
Each shape also runs with ``--contention``: a process spinning on one of the two cores the whole time.
Baseline: the healthy 2-backend pool with the same picker. Targets (issue 11): with one slow backend the
p99 <= 1.25x the healthy pool's p99 and RPS >= 0.9x, and never worse than Envoy LEAST_REQUEST.
Latencies are h2load's per-request times (--log-file). Prints a table per shape, writes
benchmarks/results/routing_quality.json and a latency-CDF PNG per shape and scenario.

    .venv/bin/python benchmarks/routing_quality.py [--shapes staggered,burst,cpu] [--contention both|on|off]
                                                   [--pickers least_latency,peak_ewma,least_conn,round_robin]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from collections.abc import Iterator
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
#: what the bad backend adds on top of the base service time
SCENARIOS = {
    "slow": {"delay_ms": 50.0, "stall_ms": 0.0, "stall_rate": 0.0},
    "stall": {"delay_ms": 0.0, "stall_ms": 2000.0, "stall_rate": 0.01},
}
HOG = [sys.executable, "-c", "import time\nend = time.time() + 3600\nwhile time.time() < end: pass"]


def shape_load(shape: str, a: argparse.Namespace) -> dict[str, Any]:
    """h2load arguments of a shape."""
    if shape == "burst":
        return {"requests": a.burst_requests, "rps": None, "stagger": False}
    rps = 8 if shape == "cpu" else a.rps_per_client
    return {"requests": a.requests, "rps": rps, "stagger": True}


def modelyard_cmd(port: int, backends: list[int], picker: str) -> list[str]:
    return [sys.executable, "-m", "modelyard.clients.cli", "balance", "--listen", f"127.0.0.1:{port}", "--no-admin",
            "--endpoints", ",".join(f"127.0.0.1:{p}" for p in backends), "--picker", picker,
            "--log-level", "WARNING"]


def run_one(cmd: list[str], port: int, a: argparse.Namespace, load: dict[str, Any], frame: Path,
            log: Path) -> dict[str, Any]:
    with Process(cmd, ready=port):
        run_h2load(port, METHOD, frame, clients=4, requests=200)  # warm up connections
        r = run_h2load(port, METHOD, frame, clients=a.concurrency, requests=load["requests"], rps=load["rps"],
                       stagger=load["stagger"], log_file=log, timeout=600)
    errors = {"failed": r.get("failed", 0), "errored": r.get("errored", 0)}
    return {"latencies_ms": r.get("latencies_ms", []), "rps": r["rps"], "errors": {k: v for k, v in errors.items() if v}}


@contextlib.contextmanager
def backends(a: argparse.Namespace, shape: str, bad: dict[str, float] | None) -> Iterator[list[int]]:
    """Two good backends (and a bad one) for ``shape``."""
    cpu = a.cpu_ms if shape == "cpu" else 0.0
    base = 0.0 if shape == "cpu" else a.base_ms
    ports = [free_port() for _ in range(3 if bad else 2)]
    with contextlib.ExitStack() as stack:
        for i, port in enumerate(ports):
            extra = dict(bad) if bad and i == 2 else {}
            delay = base + extra.pop("delay_ms", 0.0)
            stack.enter_context(Process(echo_server_cmd(port, delay_ms=delay, cpu_ms=cpu, seed=7, **extra),
                                        ready=port))
        yield ports


def run_shape(shape: str, a: argparse.Namespace, tmp: Path, frame: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    load = shape_load(shape, a)
    log = tmp / "h2load.log"
    rows: list[dict[str, Any]] = []
    samples: dict[str, dict[str, list[float]]] = {}

    def record(scenario: str, policy: str, res: dict[str, Any]) -> None:
        rows.append({"shape": shape, "scenario": scenario, "policy": policy, "ok": len(res["latencies_ms"]),
                     "errors": sum(res["errors"].values()), "rps": res["rps"], **percentiles(res["latencies_ms"])})
        samples.setdefault(scenario, {})[policy] = res["latencies_ms"]

    with backends(a, shape, None) as good:
        for picker in a.baseline_pickers:
            port = free_port()
            record("healthy", picker, run_one(modelyard_cmd(port, good, picker), port, a, load, frame, log))
    for scenario, bad in SCENARIOS.items():
        with backends(a, shape, bad) as ports:
            for picker in a.pickers:
                port = free_port()
                record(scenario, picker, run_one(modelyard_cmd(port, ports, picker), port, a, load, frame, log))
            if not a.no_envoy:
                for policy in ("LEAST_REQUEST", "ROUND_ROBIN"):
                    port, admin = free_port(), free_port()
                    cfg = envoy_config(port, admin, policy, ports, tmp / f"envoy-{shape}-{scenario}-{policy}.yaml")
                    record(scenario, f"envoy_{policy.lower()}", run_one(envoy_cmd(cfg), port, a, load, frame, log))
    plot(samples, shape)
    return rows, summarize(shape, rows)


def summarize(shape: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    by = {(r["scenario"], r["policy"]): r for r in rows}
    out: dict[str, Any] = {}
    for scenario in SCENARIOS:
        for (sc, policy), r in by.items():
            if sc != scenario or policy.startswith("envoy"):
                continue
            healthy = by.get(("healthy", policy)) or by.get(("healthy", "least_latency"))
            if healthy is None:
                continue
            key = f"{scenario}_{policy}"
            out[f"{key}_p99_over_healthy"] = r["p99"] / healthy["p99"]
            out[f"{key}_rps_over_healthy"] = r["rps"] / healthy["rps"] if healthy["rps"] else None
            lr = by.get((scenario, "envoy_least_request"))
            if lr is not None:
                out[f"{key}_p99_over_envoy_lr"] = r["p99"] / lr["p99"]
                out[f"{key}_p99.9_over_envoy_lr"] = r["p99.9"] / lr["p99.9"]
    return out


def plot(samples: dict[str, dict[str, list[float]]], shape: str) -> None:
    """One PNG per scenario of the shape: empirical latency CDF per policy, log-x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for scenario, by_policy in samples.items():
        fig, ax = plt.subplots(figsize=(8, 5))
        for policy, lat in by_policy.items():
            s = sorted(lat)
            if s:
                ax.plot(s, [(i + 1) / len(s) for i in range(len(s))], label=policy)
        ax.set_xscale("log")
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0.5, 1.001)
        ax.set_title(f"routing quality: {shape}, {scenario}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        out = RESULTS / f"routing_quality_{shape}_{scenario}.png"
        fig.savefig(out, dpi=100, bbox_inches="tight")
        plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="staggered,burst,cpu", help="comma-separated: staggered, burst, cpu")
    ap.add_argument("--contention", choices=["both", "on", "off"], default="both",
                    help="run with a CPU hog on one core (on), without (off), or each shape both ways")
    ap.add_argument("--pickers", default="least_latency,peak_ewma,least_conn,round_robin",
                    help="balancer pickers to compare")
    ap.add_argument("--requests", type=int, default=3000, help="requests per policy (paced shapes)")
    ap.add_argument("--burst-requests", type=int, default=15000, help="requests per policy (burst shape)")
    ap.add_argument("--concurrency", type=int, default=32, help="h2load connections (one stream each)")
    ap.add_argument("--rps-per-client", type=int, default=10, help="staggered shape: req/s per connection")
    ap.add_argument("--base-ms", type=float, default=5.0, help="every backend's service time (asyncio.sleep)")
    ap.add_argument("--cpu-ms", type=float, default=2.0, help="cpu shape: CPU per request on each backend")
    ap.add_argument("--no-envoy", action="store_true", help="skip Envoy's policies")
    a = ap.parse_args()
    a.pickers = [p for p in a.pickers.split(",") if p]
    a.baseline_pickers = [p for p in ("least_latency", "peak_ewma") if p in a.pickers] or a.pickers[:1]
    if not h2load_available():
        print("h2load not found (apt-get install nghttp2-client); skipping", file=sys.stderr)
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    frame = write_frame_file(BODY, tmp / "frame.bin")
    modes = {"both": [False, True], "on": [True], "off": [False]}[a.contention]
    all_rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    for contended in modes:
        for shape in [s for s in a.shapes.split(",") if s]:
            name = f"{shape}+contention" if contended else shape
            print(f"... {name}", flush=True)
            with contextlib.ExitStack() as stack:
                if contended:
                    stack.enter_context(Process(HOG, ready=None, name="cpu-hog"))
                rows, summ = run_shape(shape, a, tmp, frame)
            for r in rows:
                r["shape"] = name
            all_rows += rows
            summary[name] = summ
            print_table(rows, ["scenario", "policy", "ok", "errors", "rps", "p50", "p90", "p99", "p99.9"],
                        f"{name}: latency (ms), h2load c={a.concurrency}")
    print("\nsummary (targets: p99 <= 1.25x healthy, rps >= 0.9x healthy, p99 <= Envoy LEAST_REQUEST's)")
    for name, s in summary.items():
        for k in sorted(s):
            if k.startswith(("slow_least_latency", "stall_least_latency", "slow_peak_ewma", "stall_peak_ewma")):
                v = s[k]
                print(f"  {name:<22} {k}: {v:.3f}" if isinstance(v, float) else f"  {name:<22} {k}: {v}")
    path = write_json("routing_quality", {"concurrency": a.concurrency, "requests": a.requests,
                                          "burst_requests": a.burst_requests, "base_ms": a.base_ms,
                                          "cpu_ms": a.cpu_ms, "scenarios": SCENARIOS,
                                          "rows": all_rows, "summary": summary})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
