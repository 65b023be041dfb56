"""An ensemble (text_pipeline: tokenize -> minilm_tokens) as one call vs the client calling each step.

One ``modelyard serve`` on the example models ``tokenize``, ``minilm_tokens`` and ``text_pipeline``
(examples/model_repository, real all-MiniLM-L6-v2 weights). The same closed-loop asyncio gRPC client
drives, at each concurrency, either

* ``ensemble``: one ModelInfer of ``text_pipeline`` per sentence (the tokens stay in the server), or
* ``client chain``: ModelInfer of ``tokenize``, then ModelInfer of ``minilm_tokens`` with the returned
  ``input_ids`` / ``attention_mask`` (two round trips, the tokens serialised both ways).

One sentence per request; a request is done when its embedding is back. The two modes alternate in
``--rounds`` short rounds (ABBA...) so that a burst of other load on the machine hits both alike; a row
sums its rounds (requests/s over all of them, percentiles over every latency) and ``req_s_rounds`` shows each.

    .venv/bin/python benchmarks/ensemble.py [--duration 4] [--rounds 4]

Results: ``benchmarks/results/ensemble.json``. Bounded: about 1.5 minutes at the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import ROOT, percentiles, print_table, write_json

from modelyard.clients.aio import AsyncInferenceClient
from modelyard.launcher import ServerProcess

MODELS = ("tokenize", "minilm_tokens", "text_pipeline")
SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Ensembles keep intermediate tensors inside the server.",
    "A short one.",
    "Each step of the pipeline is batched by its own model's dynamic batcher, with the other traffic.",
]
CONCURRENCY = (1, 16)


def repository(into: Path) -> Path:
    for name in MODELS:
        shutil.copytree(ROOT / "examples" / "model_repository" / name, into / name)
    return into


def text(i: int) -> np.ndarray:
    return np.array([[SENTENCES[i % len(SENTENCES)].encode()]], dtype=object)


async def ensemble_call(client: AsyncInferenceClient, i: int) -> np.ndarray:
    return (await client.infer("text_pipeline", {"TEXT": text(i)}))["EMBEDDING"]


async def chained_calls(client: AsyncInferenceClient, i: int) -> np.ndarray:
    tokens = await client.infer("tokenize", {"TEXT": text(i)})
    out = await client.infer("minilm_tokens", {"input_ids": tokens["input_ids"],
                                               "attention_mask": tokens["attention_mask"]})
    return out["EMBEDDING"]


async def closed_loop(url: str, call: Callable[[AsyncInferenceClient, int], Awaitable[np.ndarray]],
                      concurrency: int, duration: float, warmup: float = 1.0) -> dict[str, Any]:
    """``concurrency`` workers, each sending its next request when the last one answered."""
    latencies: list[float] = []
    failed = 0
    async with AsyncInferenceClient(url) as client:
        start = time.perf_counter()
        measure_from, end = start + warmup, start + warmup + duration

        async def worker(w: int) -> None:
            nonlocal failed
            i = w
            while (now := time.perf_counter()) < end:
                try:
                    await call(client, i)
                except Exception:
                    failed += 1
                if now >= measure_from:
                    latencies.append((time.perf_counter() - now) * 1e3)
                i += concurrency

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return {"latencies_ms": latencies, "failed": failed}


async def check_same_answer(url: str) -> float:
    """Both ways give the same embedding (the largest absolute difference)."""
    async with AsyncInferenceClient(url) as client:
        a = await ensemble_call(client, 0)
        b = await chained_calls(client, 0)
    assert a.shape == (1, 384), a.shape
    return float(np.abs(a - b).max())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=4.0, help="measured seconds per round (default 4)")
    ap.add_argument("--rounds", type=int, default=4, help="rounds per mode and concurrency (default 4)")
    ap.add_argument("--warmup", type=float, default=4.0, help="unmeasured seconds per mode first (default 4)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-ensemble-") as d:
        repo = repository(Path(d))
        with ServerProcess(["--model-repository", str(repo), "--log-level", "warning"], start_timeout=180,
                           env={"HF_HUB_OFFLINE": "1"}) as server:
            diff = asyncio.run(check_same_answer(server.grpc_url))
            print(f"ensemble vs chained embedding: max |diff| = {diff:.2e}")
            # warm both paths first: torch's first calls at each new sequence length are slow
            for call in (ensemble_call, chained_calls):
                asyncio.run(closed_loop(server.grpc_url, call, 4, args.warmup, warmup=0.0))
            modes = [("ensemble", ensemble_call), ("client chain", chained_calls)]
            for c in CONCURRENCY:
                runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode, _ in modes}
                for k in range(args.rounds):
                    for mode, call in modes if k % 2 == 0 else modes[::-1]:
                        runs[mode].append(asyncio.run(closed_loop(server.grpc_url, call, c, args.duration)))
                for mode, rs in runs.items():
                    lat = [x for r in rs for x in r["latencies_ms"]]
                    rows.append({"mode": mode, "c": c, "req_s": len(lat) / (args.duration * len(rs)),
                                 **percentiles(lat, (50, 99)), "failed": sum(r["failed"] for r in rs),
                                 "req_s_rounds": [round(len(r["latencies_ms"]) / args.duration, 1) for r in rs]})
    rows.sort(key=lambda r: (r["c"], r["mode"] != "ensemble"))
    print_table(rows, ["mode", "c", "req_s", "p50", "p99", "failed", "req_s_rounds"],
                "text_pipeline: one ensemble call vs two calls")
    ratios: dict[str, float] = {}
    for c in CONCURRENCY:
        ens, chain = (next(r for r in rows if r["c"] == c and r["mode"] == m) for m in ("ensemble", "client chain"))
        ratios[f"c{c}_req_s_ensemble_over_chain"] = ens["req_s"] / chain["req_s"]
        ratios[f"c{c}_p50_ensemble_over_chain"] = ens["p50"] / chain["p50"]
        ratios[f"c{c}_p99_ensemble_over_chain"] = ens["p99"] / chain["p99"]
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")
    path = write_json("ensemble", {"rows": rows, "ratios": ratios, "max_abs_diff": diff,
                                   "command": " ".join(["benchmarks/ensemble.py", *(argv or sys.argv[1:])])})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
