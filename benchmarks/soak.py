"""Soak: ``modelyard balance`` in front of two ``modelyard serve`` replicas under a mixed load for a long time,
with the memory (RSS) and open file descriptors of every process sampled from /proc.

    flock /tmp/modelyard-bench.lock .venv/bin/python benchmarks/soak.py [--duration 300] [--requests 1000000]

Runs until ``--requests`` calls were made or ``--duration`` seconds passed (whichever first). The load is a
closed loop of ``--concurrency`` workers through the balancer, each picking its next call from a mix:

- unary ModelInfer: ``identity`` (random datatype and shape), ``add_sub``; ModelMetadata;
- ModelStreamInfer on ``token_stream_demo``, read to the end;
- client cancellations: a slow stream (DELAY_MS) cancelled after its first token, and unary calls on
  ``text_embed_demo`` (~16 ms) with a 3 ms deadline;
- errors: an unknown model (NOT_FOUND), a wrong shape (INVALID_ARGUMENT);
- connection churn: each worker opens a new channel every ``--churn`` calls.

Every ``--interval`` seconds the RSS and the number of open fds of the balancer, both replicas (with their
child processes, if any) and this load generator are read from /proc. After ``--warmup`` seconds the first
and last windows (``--window`` samples each, medians) are compared: the goal is RSS growth <= 5% and no fd
growth. Writes benchmarks/results/soak.json and soak.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import RESULTS, print_table, write_json

from modelyard.launcher import BalancerProcess, Process, ServerProcess
from modelyard.percentiles import percentile
from modelyard.protos import grpc_service_pb2 as pb
from modelyard.protos import grpc_service_pb2_grpc as pb_grpc
from modelyard.protos.tensors import DTYPES, as_bytes_array, to_raw

PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
NUMERIC = [d for d in DTYPES if d != "BYTES"]

# ---------------------------------------------------------------------- /proc


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def sample(pid: int) -> tuple[float, int]:
    """(RSS MiB, open fds) of ``pid`` and its descendants."""
    rss_kib, fds = 0, 0
    for p in descendants(pid):
        try:
            rss_kib += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * PAGE_KIB
            fds += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            continue
    return rss_kib / 1024.0, fds


# ---------------------------------------------------------------------- the load


def identity_request(rng: random.Random) -> pb.ModelInferRequest:
    dt = rng.choice(NUMERIC)
    shape = [rng.randint(1, 4), rng.randint(1, 64)]
    arr = np.frombuffer(rng.randbytes(int(np.prod(shape)) * DTYPES[dt].itemsize), dtype=DTYPES[dt]).reshape(shape)
    req = pb.ModelInferRequest(model_name="identity", id=str(rng.random()))
    req.inputs.add(name="INPUT0", datatype=dt, shape=shape)
    req.raw_input_contents.append(to_raw(arr))
    return req


def add_sub_request(model: str = "add_sub", n: int = 4) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model)
    for name in ("INPUT0", "INPUT1"):
        req.inputs.add(name=name, datatype="FP32", shape=[n])
        req.raw_input_contents.append(to_raw(np.arange(n, dtype=np.float32)))
    return req


def stream_request(words: int, delay_ms: int = 0) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="token_stream_demo")
    req.inputs.add(name="TEXT", datatype="BYTES", shape=[1])
    req.raw_input_contents.append(to_raw(as_bytes_array([" ".join(f"w{i}" for i in range(words))])))
    if delay_ms:
        req.inputs.add(name="DELAY_MS", datatype="INT32", shape=[1])
        req.raw_input_contents.append(to_raw(np.array([delay_ms], dtype=np.int32)))
    return req


def embed_request() -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="text_embed_demo")
    req.inputs.add(name="TEXT", datatype="BYTES", shape=[1, 1])
    req.raw_input_contents.append(to_raw(as_bytes_array(["a soak test"], [1, 1])))
    return req


#: (operation, weight)
MIX = [("identity", 40), ("add_sub", 12), ("metadata", 5), ("stream", 10), ("stream_cancel", 6),
       ("deadline_cancel", 7), ("not_found", 5), ("invalid", 5), ("embed", 10)]


class Load:
    def __init__(self, url: str, concurrency: int, churn: int, requests: int, seconds: float) -> None:
        self.url = url
        self.concurrency = concurrency
        self.churn = churn
        self.limit = requests
        self.end = time.monotonic() + seconds
        self.done = 0
        self.outcomes: Counter[str] = Counter()
        self.latency: dict[str, list[float]] = {}
        self.unexpected: Counter[str] = Counter()

    def more(self) -> bool:
        return self.done < self.limit and time.monotonic() < self.end

    async def run(self) -> None:
        await asyncio.gather(*(self.worker(i) for i in range(self.concurrency)))

    async def worker(self, index: int) -> None:
        rng = random.Random(index)
        ops, weights = zip(*MIX, strict=True)
        while self.more():
            async with grpc.aio.insecure_channel(self.url) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                for _ in range(self.churn):
                    if not self.more():
                        break
                    op = rng.choices(ops, weights)[0]
                    t0 = time.perf_counter()
                    outcome = await self.one(stub, op, rng)
                    self.done += 1
                    self.outcomes[f"{op}:{outcome}"] += 1
                    if outcome == "OK":
                        lat = self.latency.setdefault(op, [])
                        if len(lat) < 200_000:
                            lat.append(time.perf_counter() - t0)

    async def one(self, stub: Any, op: str, rng: random.Random) -> str:
        expected = {"not_found": "NOT_FOUND", "invalid": "INVALID_ARGUMENT", "deadline_cancel": "DEADLINE_EXCEEDED",
                    "stream_cancel": "CANCELLED"}.get(op, "OK")
        try:
            if op == "identity":
                await stub.ModelInfer(identity_request(rng), timeout=30)
            elif op == "add_sub":
                await stub.ModelInfer(add_sub_request(), timeout=30)
            elif op == "embed":
                await stub.ModelInfer(embed_request(), timeout=30)
            elif op == "metadata":
                await stub.ModelMetadata(pb.ModelMetadataRequest(name="add_sub"), timeout=30)
            elif op == "not_found":
                await stub.ModelInfer(add_sub_request("no_such_model"), timeout=30)
            elif op == "invalid":
                await stub.ModelInfer(add_sub_request(n=3), timeout=30)
            elif op == "deadline_cancel":
                await stub.ModelInfer(embed_request(), timeout=0.003)
            elif op == "stream":
                call = stub.ModelStreamInfer(iter([stream_request(5)]), timeout=30)
                n = 0
                async for reply in call:
                    if reply.error_message:
                        return "STREAM_ERROR"
                    n += 1
                    if n == 5:
                        break
                call.cancel()  # the request side stays open (an iterator of one): end the call here
                return "OK" if n == 5 else f"SHORT_{n}"
            elif op == "stream_cancel":
                call = stub.ModelStreamInfer(iter([stream_request(50, delay_ms=20)]), timeout=30)
                async for _ in call:
                    break
                call.cancel()
                return "CANCELLED"
        except grpc.aio.AioRpcError as exc:
            name = exc.code().name
            if name != expected:
                self.unexpected[f"{op}:{name}: {exc.details()[:120]}"] += 1
            return name
        if expected != "OK":
            self.unexpected[f"{op}: OK, expected {expected}"] += 1
        return "OK"


# ---------------------------------------------------------------------- the run


async def soak(url: str, procs: dict[str, int], args: argparse.Namespace) -> tuple[Load, list[dict[str, Any]]]:
    load = Load(url, args.concurrency, args.churn, args.requests, args.duration)
    samples: list[dict[str, Any]] = []
    t0 = time.monotonic()

    async def sampler() -> None:
        while True:
            row: dict[str, Any] = {"t": round(time.monotonic() - t0, 2), "requests": load.done}
            for name, pid in procs.items():
                row[f"{name}_rss_mib"], row[f"{name}_fds"] = await asyncio.to_thread(sample, pid)
            samples.append(row)
            if len(samples) % max(1, int(30 / args.interval)) == 1:
                print(f"  t={row['t']:6.0f}s requests={load.done:8d} " + " ".join(
                    f"{n}={row[f'{n}_rss_mib']:.0f}MiB/{row[f'{n}_fds']}fd" for n in procs), flush=True)
            await asyncio.sleep(args.interval)

    task = asyncio.create_task(sampler())
    try:
        await load.run()
    finally:
        await asyncio.sleep(args.interval)  # one sample after the load ends
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return load, samples


def growth(samples: list[dict[str, Any]], names: list[str], warmup: float, window: int) -> dict[str, Any]:
    after = [s for s in samples if s["t"] >= warmup]
    if len(after) < 2 * window:
        return {"error": f"only {len(after)} samples after the warm-up; run longer"}
    out: dict[str, Any] = {}
    for name in names:
        first = statistics.median(s[f"{name}_rss_mib"] for s in after[:window])
        last = statistics.median(s[f"{name}_rss_mib"] for s in after[-window:])
        fd_first = statistics.median(s[f"{name}_fds"] for s in after[:window])
        fd_last = statistics.median(s[f"{name}_fds"] for s in after[-window:])
        peak = max(s[f"{name}_rss_mib"] for s in samples)
        out[name] = {"rss_first_mib": round(first, 1), "rss_last_mib": round(last, 1),
                     "rss_growth_pct": round(100.0 * (last - first) / first, 2), "rss_peak_mib": round(peak, 1),
                     "fds_first": fd_first, "fds_last": fd_last, "fd_growth": fd_last - fd_first}
    return out


def plot(samples: list[dict[str, Any]], names: list[str], warmup: float, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no PNG (pip install matplotlib)", file=sys.stderr)
        return
    fig, (a, b) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    t = [s["t"] for s in samples]
    # the stack on the left axes; the load generator (numpy, its own latency samples) on the right ones,
    # dashed, so that its scale does not flatten the stack's lines
    a2, b2 = a.twinx(), b.twinx()
    for name in names:
        ax_rss, ax_fd, style = (a2, b2, "--") if name == "loadgen" else (a, b, "-")
        ax_rss.plot(t, [s[f"{name}_rss_mib"] for s in samples], style, label=name, color=f"C{names.index(name)}")
        ax_fd.plot(t, [s[f"{name}_fds"] for s in samples], style, label=name, color=f"C{names.index(name)}")
    for ax, twin in ((a, a2), (b, b2)):
        ax.axvline(warmup, color="grey", linestyle=":")
        lines = ax.get_legend_handles_labels()
        more = twin.get_legend_handles_labels()
        ax.legend(lines[0] + more[0], lines[1] + [f"{m} (right axis)" for m in more[1]], loc="lower right")
    a.set_ylabel("RSS (MiB)")
    a2.set_ylabel("load generator RSS (MiB)")
    b.set_ylabel("open file descriptors")
    b2.set_ylabel("load generator fds")
    b.set_xlabel(f"seconds (dotted: end of warm-up); {samples[-1]['requests']} requests")
    a.set_title("soak: modelyard balance + 2 modelyard serve replicas, mixed load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=180.0, help="seconds at most (default 180)")
    ap.add_argument("--requests", type=int, default=1_000_000, help="calls at most (default 1000000)")
    ap.add_argument("--concurrency", type=int, default=16, help="closed-loop workers (default 16)")
    ap.add_argument("--churn", type=int, default=500, help="calls per channel before a worker reconnects (default 500)")
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between /proc samples (default 5)")
    ap.add_argument("--warmup", type=float, default=None, help="seconds excluded from the growth figures "
                    "(default: a fifth of the duration, at least 30)")
    ap.add_argument("--window", type=int, default=6, help="samples in the first and last windows (default 6)")
    ap.add_argument("--name", default="soak", help="results file name (default soak)")
    args = ap.parse_args()
    warmup = args.warmup if args.warmup is not None else max(30.0, args.duration / 5)
    quiet = ["--log-level", "warning"]
    replicas = [ServerProcess(quiet, name=f"serve{i}") for i in (1, 2)]
    procs: list[Process] = []
    try:
        for r in replicas:
            r.start()
            procs.append(r)
        balancer = BalancerProcess([r.grpc_url for r in replicas], ["--log-level", "WARNING"])
        balancer.start()
        procs.append(balancer)
        pids = {"balancer": balancer.pid, "serve1": replicas[0].pid, "serve2": replicas[1].pid, "loadgen": os.getpid()}
        assert all(pids.values())
        url = f"127.0.0.1:{balancer.port}"
        print(f"soak through {url} for {args.duration:g}s or {args.requests} calls; samples every {args.interval:g}s")
        t0 = time.monotonic()
        load, samples = asyncio.run(soak(url, pids, args))  # type: ignore[arg-type]
        elapsed = time.monotonic() - t0
        alive = {p.name: p.alive() for p in procs}
    finally:
        for p in reversed(procs):
            p.stop(timeout=10)
    names = list(pids)
    summary = growth(samples, names, warmup, args.window)
    rows = [{"process": n, **summary[n]} for n in names if n in summary]
    print_table(rows, ["process", "rss_first_mib", "rss_last_mib", "rss_growth_pct", "rss_peak_mib", "fds_first",
                       "fds_last", "fd_growth"], f"after {warmup:g}s of warm-up, first vs last {args.window} samples")
    lat = {op: {"count": len(v), "p50_ms": round(percentile(sorted(v), 50) * 1e3, 3),
                "p99_ms": round(percentile(sorted(v), 99) * 1e3, 3)} for op, v in load.latency.items()}
    print(f"\n{load.done} calls in {elapsed:.0f}s ({load.done / elapsed:.0f}/s); outcomes: {dict(load.outcomes)}")
    if load.unexpected:
        print(f"UNEXPECTED outcomes: {dict(load.unexpected)}")
    print(f"processes alive at the end: {alive}")
    path = write_json(args.name, {"duration_s": args.duration, "elapsed_s": elapsed, "requests": load.done,
                                  "concurrency": args.concurrency, "churn": args.churn, "warmup_s": warmup,
                                  "window": args.window, "mix": dict(MIX), "outcomes": dict(load.outcomes),
                                  "unexpected": dict(load.unexpected), "latency": lat, "alive": alive,
                                  "growth": summary, "samples": samples})
    plot(samples, names, warmup, RESULTS / f"{args.name}.png")
    print(f"wrote {path} and {RESULTS / (args.name + '.png')}")
    ok = all(alive.values()) and not load.unexpected and "error" not in summary
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
