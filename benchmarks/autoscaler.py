"""The autoscaler with the local actuator on the demo model: step load, scale from zero, slo vs concurrency.

    .venv/bin/python benchmarks/autoscaler.py [--quick]

Each scenario starts its own stack in this process (``modelyard.autoscaler.up.Stack``: a
``modelyard balance`` process, ``modelyard serve`` replicas, the autoscaler) and drives it with
``modelyard bench`` in open loop (its own process). ``text_embed_demo`` simulates an accelerator
(its batches take wall time with the GIL released), so on a 2-core machine a replica's capacity is
bounded by the replica, and more replicas really add capacity.

- **step**: from about one replica's capacity to three or four replicas' and back. Reported: time
  from the step to the scale decision and until enough replicas were ready (and, per new replica,
  where its start went: process start and imports, model load, warmup, health, added to the
  balancer), replica changes in 60 s of steady high load, failed requests over the whole run,
  p99 during the step (first 10 s) vs after (the last 30 s of the plateau).
- **zero**: min_replicas 0; after the pool went to zero, one request: its latency is the scale-from-zero time.
- **slo vs concurrency**: the same step in each mode: replica-seconds used and the p99 held.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import print_table, write_json

from modelyard.autoscaler.up import Stack, StackConfig, Traffic
from modelyard.config import load
from modelyard.percentiles import percentile

MODEL = "text_embed_demo"
INPUTS = ['TEXT=["an autoscaling benchmark sentence"]']


def stack_config(policy: dict[str, Any]) -> StackConfig:
    return load(StackConfig, {
        "listen": "127.0.0.1:0", "balancer_admin": "127.0.0.1:0", "autoscaler_admin": "127.0.0.1:0", "tick": 1.0,
        "pools": {"text": {"models": [MODEL], "policy": policy}}})


async def run_step(policy: dict[str, Any], base: float, high: float, warm_s: float, plateau_s: float,
                   tail_s: float) -> dict[str, Any]:
    """One stack, one stepped profile; a sample of the autoscaler's view every 0.25 s."""
    stack = Stack(stack_config(policy))
    await stack.start()
    work = Path(tempfile.mkdtemp(prefix="bench-autoscaler-"))
    profile = f"{base:g}:{warm_s:g},{high:g}:{plateau_s:g},{base:g}:{tail_s:g}"
    t0 = time.monotonic()
    stack.start_traffic([Traffic(MODEL, INPUTS, profile)], work)
    samples: list[dict[str, Any]] = []
    replicas_seen: dict[str, dict[str, Any]] = {}
    try:
        while not stack.traffic_done():
            st = stack.daemon.status()["text"]
            samples.append({"t": time.monotonic() - t0, "replicas": st["replicas"], "ready": st["ready"],
                            "desired": st["desired"], "panic": st["panic"]})
            for r in st["replica_list"]:
                if r.get("timings", {}).get("added_s") is not None:
                    replicas_seen.setdefault(r["name"], r)
            await asyncio.sleep(0.25)
        decisions = stack.daemon.status()["text"]["decisions"]
    finally:
        await stack.stop()
    (_, _, out) = stack.traffic[0]
    report = json.loads(out.read_text())
    return {"profile": profile, "samples": samples, "report": report, "replicas": list(replicas_seen.values()),
            "decisions": decisions, "t0_wall": time.time() - (time.monotonic() - t0)}


def analyse(run: dict[str, Any], warm_s: float, plateau_s: float) -> dict[str, Any]:
    samples, tl = run["samples"], run["report"]["timeline"]
    step = warm_s
    plateau_end = warm_s + plateau_s
    needed = max(s["desired"] or 0 for s in samples if step + 20 <= s["t"] <= plateau_end)
    decided = next((s["t"] for s in samples if s["t"] >= step and (s["desired"] or 0) > 1), None)
    enough = next((s["t"] for s in samples if s["t"] >= step and s["ready"] >= needed), None)
    steady = [s["desired"] for s in samples if plateau_end - 60 <= s["t"] <= plateau_end]
    changes = sum(1 for a, b in itertools.pairwise(steady) if a != b)
    p99_step = [row["p99_ms"] for row in tl if step <= row["t"] < step + 10 and row["ok"]]
    p99_after = [row["p99_ms"] for row in tl if plateau_end - 30 <= row["t"] < plateau_end and row["ok"]]
    replica_seconds = sum(0.25 * s["ready"] for s in samples)
    new = [r for r in run["replicas"] if r["name"] != "text-1"]
    timings = {k: round(sum(r["timings"].get(k, 0.0) for r in new) / len(new), 3) if new else None
               for k in ("ready_line_s", "model_load_s", "warmup_s", "serving_s", "added_s")}
    report = run["report"]
    return {
        "needed_replicas": needed,
        "step_to_decision_s": None if decided is None else round(decided - step, 2),
        "step_to_enough_ready_s": None if enough is None else round(enough - step, 2),
        "new_replica_start": timings,
        "replica_changes_last_60s_of_plateau": changes,
        "requests": report["count"], "failed": report["errors"], "errors_by_code": report.get("errors_by_code", {}),
        "p99_ms_step_first_10s": round(max(p99_step), 2) if p99_step else None,
        "p99_ms_plateau_last_30s": round(sorted(p99_after)[len(p99_after) // 2], 2) if p99_after else None,
        "p99_ms_whole_run": report["latency_ms"]["p99"],
        "replica_seconds": round(replica_seconds, 1),
        "max_replicas": max(s["replicas"] for s in samples),
    }


async def run_zero(idle_s: float) -> dict[str, Any]:
    """First-request latency from zero replicas."""
    import grpc

    from modelyard.protos import grpc_service_pb2 as pb

    policy = {"min_replicas": 0, "scale_to_zero": True, "scale_to_zero_grace": 2, "max_replicas": 2,
              "stable_window": 4, "panic_window": 2}
    stack = Stack(stack_config(policy))
    await stack.start()
    try:
        deadline = time.monotonic() + idle_s + 30
        while stack.daemon.status()["text"]["replicas"] != 0:
            assert time.monotonic() < deadline, "the pool did not reach zero"
            await asyncio.sleep(0.1)
        req = pb.ModelInferRequest(model_name=MODEL)
        req.inputs.add(name="TEXT", datatype="BYTES", shape=[1, 1])
        req.raw_input_contents.append(len(b"wake up").to_bytes(4, "little") + b"wake up")
        firsts = []
        async with grpc.aio.insecure_channel(stack.grpc) as ch:
            call = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            t0 = time.monotonic()
            await call(req.SerializeToString(), timeout=30)
            firsts.append(time.monotonic() - t0)
            for _ in range(20):
                t1 = time.monotonic()
                await call(req.SerializeToString(), timeout=30)
                firsts.append(time.monotonic() - t1)
        replica = next(iter(stack.daemon.status()["text"]["replica_list"]), {})
    finally:
        await stack.stop()
    return {"first_request_s": round(firsts[0], 3), "next_requests_p50_ms": round(percentile(sorted(firsts[1:]), 50)
                                                                                    * 1e3, 2),
            "replica_start": replica.get("timings", {})}


async def main_async(a: argparse.Namespace) -> int:
    warm, plateau, tail = (10.0, 50.0, 20.0) if a.quick else (20.0, 100.0, 45.0)
    base, high = a.base, a.high
    conc = {"mode": "concurrency", "target": 3, "min_replicas": 1, "max_replicas": 5, "stable_window": 30,
            "panic_window": 4, "scale_down_delay": 5}
    slo = {**conc, "mode": "slo", "slo_p99_ms": 100.0}
    runs: dict[str, Any] = {}
    for name, policy in (("concurrency", conc), ("slo", slo)):
        print(f"... step {base:g} -> {high:g} -> {base:g} req/s, mode {name}", flush=True)
        runs[name] = await run_step(policy, base, high, warm, plateau, tail)
    print("... scale from zero", flush=True)
    zero = await run_zero(4.0)
    rows = []
    for name, run in runs.items():
        rows.append({"mode": name, **{k: v for k, v in analyse(run, warm, plateau).items()
                                      if not isinstance(v, dict)}})
    cols = ["mode", "needed_replicas", "max_replicas", "step_to_decision_s", "step_to_enough_ready_s",
            "replica_changes_last_60s_of_plateau", "requests", "failed", "p99_ms_step_first_10s",
            "p99_ms_plateau_last_30s", "p99_ms_whole_run", "replica_seconds"]
    print_table(rows, cols, f"step {base:g} -> {high:g} -> {base:g} req/s of {MODEL} (local actuator)")
    detail = {name: analyse(run, warm, plateau) for name, run in runs.items()}
    print("\nnew replica start, mean seconds from spawn (concurrency run):", detail["concurrency"]["new_replica_start"])
    print(f"scale from zero: first request {zero['first_request_s']} s (next p50 {zero['next_requests_p50_ms']} ms);"
          f" replica start {zero['replica_start']}")
    path = write_json("autoscaler", {"model": MODEL, "base_rps": base, "high_rps": high,
                                     "warm_s": warm, "plateau_s": plateau, "tail_s": tail,
                                     "step": detail, "zero": zero,
                                     "samples": {k: r["samples"] for k, r in runs.items()},
                                     "decisions": {k: r["decisions"] for k, r in runs.items()},
                                     "timelines": {k: r["report"]["timeline"] for k, r in runs.items()}})
    plot(runs, Path(path).with_suffix(".png"))
    print(f"wrote {path}")
    return 0


def plot(runs: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    for name, run in runs.items():
        tl = run["report"]["timeline"]
        axes[0].plot([r["t"] for r in tl], [r["ok"] for r in tl], label=f"{name} answered/s")
        axes[1].step([s["t"] for s in run["samples"]], [s["ready"] for s in run["samples"]], where="post",
                     label=f"{name} ready")
        axes[2].plot([r["t"] for r in tl], [r["p99_ms"] for r in tl], label=f"{name} p99")
    for ax, label in zip(axes, ("requests/s", "ready replicas", "p99 (ms)"), strict=True):
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[2].set_xlabel("seconds")
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=float, default=50.0, help="req/s before and after the step")
    ap.add_argument("--high", type=float, default=240.0, help="req/s during the step")
    ap.add_argument("--quick", action="store_true", help="shorter phases (50 s plateau; the steady-state window "
                    "then overlaps the transient)")
    return asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
