"""What a user tunes by: throughput and p99 of MiniLM served by modelyard across
``max_queue_delay_microseconds`` x ``preferred_batch_size``, at a fixed concurrency.

    .venv/bin/python benchmarks/batching_sweep.py [--duration 4] [--concurrency 32]

Writes ``benchmarks/results/batching_sweep.json`` and ``batching_sweep.png`` (throughput and p99 vs delay,
one line per preferred size). Bounded: grid of 3 x 3 points, a few seconds each.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import minilm
from h2load import h2load_available, run_h2load, write_frame_file
from report import RESULTS, ROOT, print_table, write_json

from modelyard.launcher import Process, free_port

DELAYS_US = (0, 2000, 8000)
PREFERRED = ((), (16,), (32,))


def serve_once(tmp: Path, delay_us: int, preferred: tuple[int, ...], concurrency: int, duration: float) -> dict[str, Any]:
    repo = minilm.modelyard_repo(tmp / f"r{delay_us}_{'-'.join(map(str, preferred)) or 'none'}", delay_us, 64)
    cfg_path = repo / "minilm" / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["dynamic_batching"]["preferred_batch_size"] = list(preferred)
    cfg_path.write_text(yaml.safe_dump(cfg))
    gport, hport = free_port(), free_port()
    cmd = [str(ROOT / ".venv/bin/modelyard"), "serve", "--model-repository", str(repo),
           "--grpc-port", str(gport), "--http-port", str(hport), "--log-level", "warning"]
    frame = write_frame_file(minilm.infer_request_bytes("minilm"), tmp / "sweep.frame")
    with Process(cmd, ready=gport, start_timeout=120, env={"HF_HUB_OFFLINE": "1"}):
        minilm.check_answer(gport, "minilm")
        r = run_h2load(gport, minilm.METHOD, frame, clients=concurrency, duration=duration, warmup=1.0,
                               log_file=tmp / ".sweep.log")
    return {"delay_us": delay_us, "preferred": list(preferred), "sent_s": r["rps"], "p50": r.get("p50"),
            "p99": r.get("p99")}


def plot(rows: list[dict[str, Any]], concurrency: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for pref in PREFERRED:
        pts = [r for r in rows if r["preferred"] == list(pref)]
        label = f"preferred {list(pref) or 'none'}"
        a.plot([p["delay_us"] for p in pts], [p["sent_s"] for p in pts], marker="o", label=label)
        b.plot([p["delay_us"] for p in pts], [p["p99"] for p in pts], marker="o", label=label)
    a.set(xlabel="max_queue_delay_microseconds", ylabel="sentences/s", title=f"throughput, c={concurrency}")
    b.set(xlabel="max_queue_delay_microseconds", ylabel="p99 ms", title=f"p99 latency, c={concurrency}")
    a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args(argv)
    if not h2load_available():
        print("batching_sweep needs h2load (apt-get install nghttp2-client); skipped")
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as d:
        for delay in DELAYS_US:
            for pref in PREFERRED:
                rows.append(serve_once(Path(d), delay, pref, args.concurrency, args.duration))
                print(rows[-1], flush=True)
    print_table(rows, ["delay_us", "preferred", "sent_s", "p50", "p99"], "batching sweep")
    png = RESULTS / "batching_sweep.png"
    plot(rows, args.concurrency, png)
    path = write_json("batching_sweep", {"concurrency": args.concurrency, "rows": rows, "plot": str(png)})
    print(f"wrote {path} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
