"""Goodput and p99 of ``modelyard serve`` past its capacity, with and without load shedding.

    flock /tmp/modelyard-bench.lock .venv/bin/python benchmarks/overload.py [--loads 0.8,2] [--duration 20]

A model that takes ``--service-ms`` per request on one instance (a sleep: the GIL is released, as in a
GPU kernel, so the host's CPU is not what runs out) has a capacity of about 1000/service_ms requests/s;
the script measures it first (closed loop). Then, for each configuration, an open-loop client sends
at ``load x capacity`` for ``--duration`` seconds, each request with a ``--timeout`` deadline (what
a real client sets), whatever the answers do:

- ``none``: ``--max-inflight 0``, no queue bound: requests queue without limit;
- ``max_inflight``: ``--max-inflight N`` (default 8): one more is refused at once;
- ``max_queue_ms``: ``--max-queue-ms Q`` (default 50): a request not started within Q ms is refused;
- ``balancer_none``: ``modelyard balance`` in front of the ``none`` server (default circuit breakers);
- ``balancer_max_requests``: the same with ``circuit_breakers.max_requests: N`` (the ``--max-inflight``
  bound): the balancer sheds (RESOURCE_EXHAUSTED at once) before the replica's queue grows.

Reported per configuration and load: goodput (OK answers within ``--slo-ms`` per second of sending),
all OK answers per second (late ones too), refusals (RESOURCE_EXHAUSTED), deadline failures, p50/p99
of the OK answers and p99 of all answers (a deadline failure counts at the deadline).
Writes benchmarks/results/overload.json and overload.png (p99 and goodput per second over the run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import RESULTS, print_table, write_json

from modelyard.clients.aio import AsyncInferenceClient
from modelyard.clients.bench import Segment, run_bench, run_open_loop
from modelyard.launcher import BalancerProcess, ServerProcess
from modelyard.percentiles import percentile

MODEL = textwrap.dedent('''
    import time
    import numpy as np
    from modelyard.server.types import InferResponse

    class Model:
        def load(self, ctx):
            self.seconds = float(ctx.config.parameters.get("service_ms", "10")) / 1000.0

        def execute(self, requests):
            out = []
            for r in requests:
                time.sleep(self.seconds)
                out.append(InferResponse(outputs={"Y": r.inputs["X"]}))
            return out
''')
CONFIG = textwrap.dedent('''\
    backend: python
    input: [{{name: X, data_type: TYPE_FP32, dims: [4]}}]
    output: [{{name: Y, data_type: TYPE_FP32, dims: [4]}}]
    instance_group: [{{count: 1, kind: CPU}}]
    parameters: {{service_ms: "{service_ms}"}}
''')
X = {"X": np.arange(4, dtype=np.float32)}


def repository(service_ms: float) -> Path:
    root = Path(tempfile.mkdtemp(prefix="modelyard-overload-"))
    (root / "work" / "1").mkdir(parents=True)
    (root / "work" / "config.yaml").write_text(CONFIG.format(service_ms=service_ms))
    (root / "work" / "1" / "model.py").write_text(MODEL)
    return root


async def capacity(url: str, seconds: float) -> float:
    async with AsyncInferenceClient(url) as client:
        await run_bench(client, "work", X, concurrency=4, requests=20)
        report = await run_bench(client, "work", X, concurrency=8, duration=seconds, request_timeout=30)
    return report.count / report.elapsed_s


async def offer(url: str, rps: float, seconds: float, deadline: float, slo_ms: float) -> dict[str, Any]:
    async with AsyncInferenceClient(url) as client:
        report = await run_open_loop(client, "work", X, [Segment(rps, rps, seconds)], request_timeout=deadline,
                                     max_inflight=100_000, profile_text=f"{rps:g}:{seconds:g}")
    ok = sorted(report.latencies_s)
    every = sorted(lat for _, lat, _ in report.records if lat is not None)
    # time to any answer (errors too): the client's own clock from send to failure is not recorded per
    # request by run_open_loop, so failures count at the deadline when they are DEADLINE_EXCEEDED
    answers = every + [deadline if err == "DEADLINE_EXCEEDED" else 0.0
                       for _, lat, err in report.records if lat is None]
    answers.sort()
    span = max(t for t, _, _ in report.records) + 1e-9 if report.records else seconds
    return {
        "offered_rps": rps, "sent": len(report.records), "elapsed_s": report.elapsed_s,
        # goodput: useful answers, OK within the latency objective, per second of sending
        "goodput_rps": sum(1 for lat in ok if lat * 1000 <= slo_ms) / span,
        # every OK answer, late ones included, per second until the last answer came
        "ok_rps": len(ok) / report.elapsed_s,
        "ok": len(ok), "errors_by_code": dict(report.errors),
        "refused": report.errors.get("RESOURCE_EXHAUSTED", 0),
        "deadline": report.errors.get("DEADLINE_EXCEEDED", 0),
        "ok_p50_ms": percentile(ok, 50) * 1e3, "ok_p99_ms": percentile(ok, 99) * 1e3,
        "all_p99_ms": percentile(answers, 99) * 1e3,
        "timeline": report.timeline(),
    }


def plot(results: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no PNG (pip install matplotlib)", file=sys.stderr)
        return
    over = [r for r in results if r["load"] == max(x["load"] for x in results)]
    fig, (a, b) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for r in over:
        tl = r["timeline"]
        # a second without an OK answer has no p99: a gap in the line
        a.plot([p["t"] for p in tl], [p["p99_ms"] if p["ok"] else float("nan") for p in tl], label=r["config"])
        b.plot([p["t"] for p in tl], [p["ok"] for p in tl], label=r["config"])  # OK answers of requests sent that second
    a.set_yscale("log")
    a.set_ylabel("p99 of OK answers (ms, per second sent)")
    b.set_ylabel("OK answers / s (by send time)")
    b.set_xlabel("seconds into the run")
    a.set_title(f"modelyard serve at {over[0]['load']:g}x capacity: shedding vs queueing")
    a.legend()
    b.axhline(over[0]["capacity_rps"], color="grey", linestyle=":", label="capacity")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--service-ms", type=float, default=10.0, help="model time per request (default 10)")
    ap.add_argument("--loads", default="0.8,2", help="offered load as multiples of capacity (default 0.8,2)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of open-loop load per run (default 20)")
    ap.add_argument("--timeout", type=float, default=5.0, help="each request's deadline, seconds (default 5)")
    ap.add_argument("--slo-ms", type=float, default=500.0, help="latency objective for goodput_slo (default 500)")
    ap.add_argument("--max-inflight", type=int, default=8, help="the max_inflight configuration's bound (default 8)")
    ap.add_argument("--max-queue-ms", type=float, default=50.0, help="the max_queue_ms configuration's bound (default 50)")
    args = ap.parse_args()
    repo = repository(args.service_ms)
    configs = {
        "none": ["--max-inflight", "0"],
        "max_inflight": ["--max-inflight", str(args.max_inflight)],
        "max_queue_ms": ["--max-inflight", "0", "--max-queue-ms", f"{args.max_queue_ms:g}"],
        "balancer_none": ["--max-inflight", "0"],
        "balancer_max_requests": ["--max-inflight", "0"],
    }
    #: the balancer's circuit breaker per configuration (a balancer in front of the server when present)
    breakers = {"balancer_none": {}, "balancer_max_requests": {"max_requests": args.max_inflight}}
    loads = [float(x) for x in args.loads.split(",")]
    results: list[dict[str, Any]] = []
    cap = 0.0
    for name, flags in configs.items():
        with contextlib.ExitStack() as stack:
            srv = stack.enter_context(ServerProcess(["--model-repository", str(repo), "--log-level", "warning",
                                                     *flags], name=name))
            url = srv.grpc_url
            if name in breakers:
                bal = stack.enter_context(BalancerProcess(config={
                    "listeners": [{"address": "127.0.0.1:0"}], "admin": {"address": "127.0.0.1:0"},
                    "pools": {"default": {"endpoints": {"static": [srv.grpc_url]},
                                          "circuit_breakers": breakers[name]}}}))
                url = f"127.0.0.1:{bal.port}"
            if not cap:
                cap = asyncio.run(capacity(url, 5.0))
                print(f"capacity: {cap:.1f} requests/s (service {args.service_ms:g} ms, 1 instance)")
            for load in loads:
                r = asyncio.run(offer(url, load * cap, args.duration, args.timeout, args.slo_ms))
                r.update(config=name, load=load, capacity_rps=cap)
                results.append(r)
                print(f"  {name:13s} load {load:g}x: goodput {r['goodput_rps']:.1f}/s (ok {r['ok_rps']:.1f}/s), "
                      f"ok p99 {r['ok_p99_ms']:.0f} ms, "
                      f"refused {r['refused']}, deadline {r['deadline']}", flush=True)
    cols = ["config", "load", "offered_rps", "goodput_rps", "ok_rps", "refused", "deadline", "ok_p50_ms",
            "ok_p99_ms", "all_p99_ms"]
    print_table(results, cols, f"open loop against one instance of {args.service_ms:g} ms/request "
                               f"(deadline {args.timeout:g} s, SLO {args.slo_ms:g} ms)")
    path = write_json("overload", {"service_ms": args.service_ms, "duration_s": args.duration,
                                   "timeout_s": args.timeout, "slo_ms": args.slo_ms, "capacity_rps": cap,
                                   "configs": configs, "results": results})
    plot(results, RESULTS / "overload.png")
    print(f"\nwrote {path} and {RESULTS / 'overload.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
