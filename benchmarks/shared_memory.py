"""A 16 MB FP32 tensor through the ``identity`` model: gRPC copy vs Triton's system shared memory.

    flock /tmp/modelyard-bench.lock .venv/bin/python benchmarks/shared_memory.py [--duration 5] [--levels 1,4]

One ``modelyard serve`` (started here) and tritonclient.grpc, the client such users have:

* **copy**: the tensor travels in ``raw_input_contents`` and comes back in ``raw_output_contents``
  (tritonclient serialises it into the protobuf, the server decodes and re-encodes it);
* **shm**: each client thread has an input and an output region in /dev/shm, registered once; per
  request it writes the input into its region (one memcpy, counted), the request names the regions,
  the server copies the input out and the output in, and the client reads the output in place.

Closed loop, ``c`` threads each with its own client (and regions), alternating modes for
``--rounds`` rounds; medians of the rounds are compared. Prints a table and writes
benchmarks/results/shared_memory.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import percentiles, print_table, write_json

from modelyard.launcher import Process, free_port

MB = 1024 * 1024


class Worker:
    """One client thread's connection and (for shm) its two registered regions."""

    def __init__(self, url: str, mode: str, array: np.ndarray, index: int) -> None:
        import tritonclient.grpc as grpcclient
        import tritonclient.utils.shared_memory as shm

        self.g, self.shm = grpcclient, shm
        self.client = grpcclient.InferenceServerClient(url)
        self.mode, self.array = mode, array
        self.nbytes = array.nbytes
        self.handles: list[Any] = []
        tag = f"{uuid.uuid4().hex[:8]}_{index}"
        if mode == "shm":
            for kind in ("in", "out"):
                key = f"/modelyard_bench_{kind}_{tag}"
                handle = shm.create_shared_memory_region(f"{kind}_{tag}", key, self.nbytes)
                self.handles.append(handle)
                self.client.register_system_shared_memory(f"{kind}_{tag}", key, self.nbytes)
            self.in_name, self.out_name = f"in_{tag}", f"out_{tag}"

    def call(self) -> np.ndarray:
        g = self.g
        inp = g.InferInput("INPUT0", list(self.array.shape), "FP32")
        out = g.InferRequestedOutput("OUTPUT0")
        if self.mode == "copy":
            inp.set_data_from_numpy(self.array)
            return self.client.infer("identity", [inp], outputs=[out]).as_numpy("OUTPUT0")
        self.shm.set_shared_memory_region(self.handles[0], [self.array])
        inp.set_shared_memory(self.in_name, self.nbytes)
        out.set_shared_memory(self.out_name, self.nbytes)
        self.client.infer("identity", [inp], outputs=[out])
        return self.shm.get_contents_as_numpy(self.handles[1], np.float32, list(self.array.shape))

    def close(self) -> None:
        if self.mode == "shm":
            self.client.unregister_system_shared_memory(self.in_name)
            self.client.unregister_system_shared_memory(self.out_name)
            for handle in self.handles:
                self.shm.destroy_shared_memory_region(handle)
        self.client.close()


def run(url: str, mode: str, array: np.ndarray, concurrency: int, duration: float) -> dict[str, Any]:
    workers = [Worker(url, mode, array, i) for i in range(concurrency)]
    try:
        for w in workers:  # warm-up, and proof that the answer is right
            np.testing.assert_array_equal(w.call(), array)
        latencies: list[list[float]] = [[] for _ in workers]
        errors: list[BaseException] = []
        stop = time.perf_counter() + duration

        def loop(i: int) -> None:
            try:
                while time.perf_counter() < stop:
                    t0 = time.perf_counter()
                    workers[i].call()
                    latencies[i].append(time.perf_counter() - t0)
            except BaseException as exc:
                errors.append(exc)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=loop, args=(i,)) for i in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        if errors:
            raise errors[0]
    finally:
        for w in workers:
            w.close()
    lat = [x * 1000 for xs in latencies for x in xs]
    p = percentiles(lat, (50, 99))
    rps = len(lat) / elapsed
    return {"rps": rps, "mb_per_s": rps * array.nbytes / MB, "p50_ms": p["p50"], "p99_ms": p["p99"],
            "requests": len(lat)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per run (default 5)")
    ap.add_argument("--levels", default="1,4", help="client threads (default 1,4)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per level (default 2)")
    ap.add_argument("--mb", type=int, default=16, help="tensor size in MiB (default 16)")
    args = ap.parse_args()
    array = np.random.default_rng(0).random(args.mb * MB // 4, dtype=np.float32)
    grpc_port, http_port = free_port(), free_port()
    serve = [sys.executable, "-m", "modelyard.clients.cli", "serve", "--grpc-port", str(grpc_port),
             "--http-port", str(http_port), "--model", "identity", "--log-level", "warning",
             "--max-message-mb", str(max(64, 4 * args.mb))]
    rows = []
    with Process(serve, name="modelyard"):
        url = f"127.0.0.1:{grpc_port}"
        for c in (int(x) for x in args.levels.split(",")):
            runs: dict[str, list[dict[str, Any]]] = {"copy": [], "shm": []}
            for _ in range(args.rounds):
                for mode in runs:
                    runs[mode].append(run(url, mode, array, c, args.duration))
            row: dict[str, Any] = {"concurrency": c}
            for mode, results in runs.items():
                for key in ("rps", "mb_per_s", "p50_ms", "p99_ms"):
                    row[f"{mode}_{key}"] = statistics.median(r[key] for r in results)
                row[f"{mode}_rps_runs"] = [r["rps"] for r in results]
            row["rps_ratio"] = row["shm_rps"] / row["copy_rps"] if row["copy_rps"] else None
            row["p50_ratio"] = row["shm_p50_ms"] / row["copy_p50_ms"] if row["copy_p50_ms"] else None
            rows.append(row)
    cols = ["concurrency", "copy_rps", "shm_rps", "rps_ratio", "copy_mb_per_s", "shm_mb_per_s",
            "copy_p50_ms", "shm_p50_ms", "p50_ratio", "copy_p99_ms", "shm_p99_ms"]
    print_table(rows, cols, f"identity, FP32 {args.mb} MiB, tritonclient.grpc: gRPC copy vs system shared memory")
    path = write_json("shared_memory", {"rows": rows, "duration_s": args.duration, "rounds": args.rounds,
                                        "tensor_bytes": array.nbytes})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
