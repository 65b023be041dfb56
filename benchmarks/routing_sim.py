"""Routing quality in simulation: the balancer's real pickers against simulated backends, no noise.

The live benchmark (routing_quality.py) runs on a 2-core machine shared by the backends, the proxy, the
load generator and other work, so its tails carry scheduling noise as large as the effects measured.
Here the same picker classes (fake clock, seeded RNG) route requests to simulated endpoints in a
discrete-event simulation, so each shape's result is exact and repeatable:

  io:   latency does not grow with requests in flight (a 5 ms sleep: I/O bound, batching accelerators);
  cpu:  one request at a time, FIFO, 2 ms of service each (latency grows with requests in flight).
One of three endpoints is slow: +50 ms (io: a longer sleep; cpu: 50 ms more per request, so it is also
a slower server). Loads: ``paced`` (Poisson arrivals, 60% of the healthy pair's capacity for cpu, 320/s
for io) and ``burst`` (32 closed-loop clients all starting at once). Baseline: the healthy pair with
the same picker.

    .venv/bin/python benchmarks/routing_sim.py [--requests 40000]
"""

from __future__ import annotations

import argparse
import heapq
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import print_table, write_json

from modelyard.balancer.endpoint import Endpoint, Outcome, Snapshot
from modelyard.balancer.pickers import PICKERS
from modelyard.clock import FakeClock
from modelyard.percentiles import percentiles


class Backend:
    """``io``: each request takes ``base`` (concurrently); ``cpu``: one at a time, ``base`` each, FIFO."""

    def __init__(self, kind: str, base: float) -> None:
        self.kind, self.base = kind, base
        self.free_at = 0.0

    def finish_time(self, now: float) -> float:
        if self.kind == "io":
            return now + self.base
        start = max(now, self.free_at)
        self.free_at = start + self.base
        return self.free_at


def simulate(picker_name: str, kind: str, load: str, slow: bool, requests: int, seed: int = 1) -> dict[str, Any]:
    clock = FakeClock(0.0)
    rng = random.Random(seed)
    picker = PICKERS[picker_name](clock=clock, rng=random.Random(seed + 1))
    base = 0.005 if kind == "io" else 0.002
    n = 3 if slow else 2
    backends = [Backend(kind, base) for _ in range(2)]
    if slow:
        backends.append(Backend(kind, base + 0.050))
    eps = [Endpoint(f"127.0.0.1:{i + 1}") for i in range(n)]
    snap = Snapshot.of("p", tuple(eps))
    index = {id(e): i for i, e in enumerate(eps)}
    events: list[tuple[float, int, str, Any]] = []
    seq = 0
    latencies: list[float] = []

    def push(t: float, kind_: str, data: Any) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind_, data))

    if load == "paced":
        rate = 320.0 if kind == "io" else 0.6 * 2 / base
        t = 0.0
        for _ in range(requests):
            t += rng.expovariate(rate)
            push(t, "arrive", None)
    else:  # burst: 32 closed-loop clients from a synchronized start
        for _ in range(32):
            push(0.0, "arrive", None)
    sent = 0
    while events:
        t, _, what, data = heapq.heappop(events)
        clock.t = t
        if what == "arrive":
            if sent >= requests:
                continue
            sent += 1
            ep = picker.pick(snap)
            inflight = ep.outstanding
            ep.outstanding += 1
            done = backends[index[id(ep)]].finish_time(t)
            push(done, "done", (ep, t, inflight))
        else:
            ep, t0, inflight = data
            ep.outstanding -= 1
            latencies.append(t - t0)
            picker.on_done(ep, Outcome.SUCCESS, t - t0, inflight)
            if load == "burst":
                push(t, "arrive", None)
    lat_ms = [x * 1e3 for x in latencies]
    span = clock.t
    return {"picker": picker_name, "shape": f"{kind}/{load}", "scenario": "slow" if slow else "healthy",
            "rps": len(lat_ms) / span if span else 0.0, **percentiles(lat_ms)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=40000, help="requests per run")
    ap.add_argument("--pickers", default="least_latency,peak_ewma,least_conn,round_robin")
    a = ap.parse_args()
    rows = []
    summary: dict[str, float] = {}
    for kind in ("io", "cpu"):
        for load in ("paced", "burst"):
            for name in a.pickers.split(","):
                healthy = simulate(name, kind, load, False, a.requests)
                slow = simulate(name, kind, load, True, a.requests)
                rows += [healthy, slow]
                key = f"{kind}_{load}_{name}"
                summary[f"{key}_p99_over_healthy"] = slow["p99"] / healthy["p99"]
                summary[f"{key}_rps_over_healthy"] = slow["rps"] / healthy["rps"]
    print_table(rows, ["shape", "picker", "scenario", "rps", "p50", "p99", "p99.9"],
                "simulated routing (ms): one of three endpoints +50 ms vs the healthy pair")
    print("\np99 / healthy p99 and rps / healthy rps (targets: <= 1.25 and >= 0.9)")
    for k, v in summary.items():
        print(f"  {k}: {v:.3f}")
    print(f"wrote {write_json('routing_sim', {'requests': a.requests, 'rows': rows, 'summary': summary})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
