#!/usr/bin/env python
"""Run Triton's own Python client examples against modelyard and report how each one fares.

The examples are not part of this repository: fetch them from triton-inference-server/client
(``src/python/examples/``) into a directory and point this script at it::

    .venv/bin/python examples/triton-client-examples-client-examples/run_examples.py /tmp/triton-examples

For every example it knows (``RUNS`` below: script, arguments, which server) that exists in that
directory, it starts ``modelyard serve`` on ``examples/triton-client-examples-client-examples/model_repository`` (free ports,
through ``modelyard.launcher``; one server at a time), runs the script with ``-u host:port`` of the
gRPC or HTTP endpoint, as the script expects, and records PASS / FAIL / SKIP with the last lines
of its output. A run passes when the script exits 0 and, if the script has a ``PASS`` line to
print, printed it (some examples exit 0 without checking what they meant to check). The table goes
to stdout, the details to ``benchmarks/results/triton_examples.json``.

Servers:

* ``default``: every model of the repository, control mode unset;
* ``explicit8`` / ``explicit7``: ``--model-control-mode explicit`` on a copy of the repository with 8
  (gRPC model-control examples) or 7 (HTTP ones) models, the counts those examples assert;
* ``fixed``: the default server on ports 8000/8001, for ``memory_growth_test.py``, which has no
  ``-u`` and always dials localhost:8000/8001 (skipped when those ports are taken).

CUDA shared-memory examples need a GPU on the client's machine; without one (no working
``nvidia-smi``) a failing run is reported as SKIP.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from modelyard import launcher

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
REPOSITORY = HERE / "model_repository"
RESULTS = ROOT / "benchmarks" / "results" / "triton_examples.json"

#: the models the model-control examples expect to find (they assert the repository index's size)
CONTROL_MODELS = ["simple", "simple_string", "simple_identity", "simple_int8", "simple_sequence",
                  "simple_dyna_sequence", "simple_string_dyna_sequence", "repeat_int32"]


@dataclass(frozen=True)
class Run:
    script: str
    args: tuple[str, ...] = ()
    #: which endpoint ``-u`` names: grpc, http, or none (the script takes no -u)
    endpoint: str = "grpc"
    server: str = "default"
    #: the script needs a CUDA device on the client side
    cuda: bool = False
    #: an image file is appended to the arguments
    image: bool = False


def _runs() -> list[Run]:
    runs: list[Run] = []
    g, h = "grpc", "http"
    for name in ["simple_grpc_infer_client", "simple_grpc_async_infer_client", "simple_grpc_string_infer_client",
                 "simple_grpc_health_metadata", "simple_grpc_custom_args_client", "simple_grpc_keepalive_client",
                 "simple_grpc_custom_repeat", "simple_grpc_shm_client", "simple_grpc_shm_string_client",
                 "simple_grpc_aio_infer_client", "simple_grpc_aio_string_infer_client",
                 "simple_grpc_aio_health_metadata", "simple_grpc_aio_custom_args_client",
                 "simple_grpc_aio_keepalive_client", "simple_grpc_aio_shm_client",
                 "simple_grpc_aio_shm_string_client",
                 "grpc_explicit_int_content_client", "grpc_explicit_int8_content_client",
                 "grpc_explicit_byte_content_client", "grpc_client"]:
        runs.append(Run(f"{name}.py", endpoint=g))
    for name in ["simple_grpc_sequence_stream_infer_client", "simple_grpc_sequence_sync_infer_client",
                 "simple_grpc_aio_sequence_stream_infer_client", "simple_grpc_aio_sequence_sync_infer_client"]:
        runs.append(Run(f"{name}.py", endpoint=g))
        runs.append(Run(f"{name}.py", ("-d",), endpoint=g))
    for name in ["simple_http_infer_client", "simple_http_async_infer_client", "simple_http_string_infer_client",
                 "simple_http_health_metadata", "simple_http_shm_client", "simple_http_shm_string_client",
                 "simple_http_aio_infer_client", "simple_http_aio_string_infer_client",
                 "simple_http_aio_health_metadata", "simple_http_aio_shm_client",
                 "simple_http_aio_shm_string_client"]:
        runs.append(Run(f"{name}.py", endpoint=h))
    for name in ["simple_http_sequence_sync_infer_client", "simple_http_aio_sequence_sync_infer_client"]:
        runs.append(Run(f"{name}.py", endpoint=h))
        runs.append(Run(f"{name}.py", ("-d",), endpoint=h))
    for name in ["simple_grpc_cudashm_client", "simple_grpc_aio_cudashm_client"]:
        runs.append(Run(f"{name}.py", endpoint=g, cuda=True))
    for name in ["simple_http_cudashm_client", "simple_http_aio_cudashm_client"]:
        runs.append(Run(f"{name}.py", endpoint=h, cuda=True))
    runs.append(Run("reuse_infer_objects_client.py", ("-i", "HTTP"), endpoint=h))
    runs.append(Run("reuse_infer_objects_client.py", ("-i", "gRPC"), endpoint=g))
    runs.append(Run("ensemble_image_client.py", ("-i", "HTTP", "-c", "3"), endpoint=h, image=True))
    runs.append(Run("ensemble_image_client.py", ("-i", "gRPC", "-c", "3"), endpoint=g, image=True))
    for name in ["simple_grpc_model_control", "simple_grpc_aio_model_control"]:
        runs.append(Run(f"{name}.py", endpoint=g, server="explicit8"))
    for name in ["simple_http_model_control", "simple_http_aio_model_control"]:
        runs.append(Run(f"{name}.py", endpoint=h, server="explicit7"))
    runs.append(Run("memory_growth_test.py", ("-i", "HTTP", "-r", "20"), endpoint="none", server="fixed"))
    runs.append(Run("memory_growth_test.py", ("-i", "gRPC", "-r", "20"), endpoint="none", server="fixed"))
    return runs


RUNS = _runs()


@dataclass
class Result:
    script: str
    args: list[str]
    server: str
    status: str  # PASS, FAIL, SKIP
    rc: int | None
    seconds: float
    reason: str = ""
    source: str = ""
    tail: list[str] = field(default_factory=list)


def _source(path: Path) -> str:
    """The upstream commit the saved copy says it came from (a ``Source: ...`` header line), if any."""
    with path.open(errors="replace") as f:
        for line in itertools.islice(f, 10):
            m = re.search(r"Source:\s*(\S+)", line)
            if m:
                return m.group(1)
    return ""


def _gpu_available() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _image(tmp: Path) -> Path:
    """A small generated JPEG (the examples' own images are not needed: the models are stand-ins)."""
    from PIL import Image

    path = tmp / "images" / "gradient.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    import numpy as np

    y, x = np.mgrid[0:64, 0:96]
    pixels = np.stack([x * 2, y * 3, (x + y)], axis=-1).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def _control_repository(tmp: Path, count: int) -> Path:
    repo = tmp / f"control{count}"
    if not repo.exists():
        for name in CONTROL_MODELS[:count]:
            shutil.copytree(REPOSITORY / name, repo / name)
    return repo


def _strip(url: str) -> str:
    return url.split("://", 1)[-1]


def _server_args(kind: str, tmp: Path) -> list[str] | None:
    # the health/metadata examples check that the server calls itself "triton"
    args = _mode_args(kind, tmp)
    return None if args is None else [*args, "--server-name", "triton"]


def _mode_args(kind: str, tmp: Path) -> list[str] | None:
    if kind == "default":
        return ["--model-repository", str(REPOSITORY)]
    if kind == "explicit8":
        return ["--model-repository", str(_control_repository(tmp, 8)), "--model-control-mode", "explicit"]
    if kind == "explicit7":
        return ["--model-repository", str(_control_repository(tmp, 7)), "--model-control-mode", "explicit"]
    if kind == "fixed":
        if launcher.port_open(8000) or launcher.port_open(8001):
            return None
        return ["--model-repository", str(REPOSITORY), "--grpc-port", "8001", "--http-port", "8000"]
    raise ValueError(kind)


def _run_one(run: Run, path: Path, server: launcher.ServerProcess | None, timeout: float, gpu: bool,
             image: Path | None, tail_lines: int) -> Result:
    args = list(run.args)
    if run.endpoint == "grpc":
        args = ["-u", _strip(server.grpc_url), *args]  # type: ignore[union-attr]
    elif run.endpoint == "http":
        args = ["-u", _strip(server.http_url), *args]  # type: ignore[union-attr]
    if run.image and image is not None:
        args.append(str(image))
    start = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, timeout=timeout,
                              cwd=path.parent, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        rc: int | None = proc.returncode
        output = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc = None
        output = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        output += f"\n[timed out after {timeout:.0f}s]"
    seconds = time.monotonic() - start
    text = path.read_text(errors="replace")
    expects_pass_line = bool(re.search(r"""print\(\s*['"]PASS""", text))
    ok = rc == 0 and (not expects_pass_line or re.search(r"^PASS", output, re.M) is not None)
    reason = ""
    if ok:
        status = "PASS"
    elif run.cuda and not gpu:
        status, reason = "SKIP", "needs a CUDA device (none on this machine)"
    else:
        status = "FAIL"
        if rc == 0:
            reason = "exit 0 without its PASS line"
        elif rc is None:
            reason = "timeout"
        else:
            reason = f"exit {rc}"
    lines = [ln for ln in output.splitlines() if ln.strip()]
    return Result(run.script, list(run.args), run.server, status, rc, round(seconds, 2), reason, _source(path),
                  lines[-tail_lines:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("examples", type=Path, help="directory holding the downloaded example scripts")
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds per script (default 90)")
    parser.add_argument("--only", default="", help="regular expression: run only scripts whose name matches")
    parser.add_argument("--tail", type=int, default=6, help="output lines kept per run (default 6)")
    parser.add_argument("--json", type=Path, default=RESULTS, help=f"where to write the results (default {RESULTS})")
    opts = parser.parse_args(argv)

    gpu = _gpu_available()
    runs = [r for r in RUNS if (opts.examples / r.script).is_file() and re.search(opts.only, r.script)]
    missing = sorted({r.script for r in RUNS if not (opts.examples / r.script).is_file()})
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="triton-examples-") as tmp_name:
        tmp = Path(tmp_name)
        image = _image(tmp) if any(r.image for r in runs) else None
        for kind in ["default", "explicit8", "explicit7", "fixed"]:
            batch = [r for r in runs if r.server == kind]
            if not batch:
                continue
            extra = _server_args(kind, tmp)
            if extra is None:
                for r in batch:
                    results.append(Result(r.script, list(r.args), kind, "SKIP", None, 0.0,
                                          "ports 8000/8001 are taken (the script has no -u)", _source(opts.examples / r.script)))
                continue
            print(f"== server {kind}: modelyard serve {' '.join(extra)}", flush=True)
            with launcher.ServerProcess(extra) as server:
                for r in batch:
                    res = _run_one(r, opts.examples / r.script, server, opts.timeout, gpu, image, opts.tail)
                    results.append(res)
                    print(f"   {res.status:4} {res.script} {' '.join(res.args)} ({res.seconds:.1f}s)", flush=True)
                    if not server.alive():
                        print(f"!! the server exited: {server.log_tail()}", flush=True)
                        break

    width = max(len(f"{r.script} {' '.join(r.args)}") for r in results) if results else 10
    print()
    print(f"{'script':{width}}  {'server':9}  status  last output")
    for r in results:
        name = f"{r.script} {' '.join(r.args)}".strip()
        last = (r.tail[-1] if r.tail else "")[:120]
        print(f"{name:{width}}  {r.server:9}  {r.status:6}  {last}")
    passed = sum(r.status == "PASS" for r in results)
    skipped = sum(r.status == "SKIP" for r in results)
    print(f"\n{passed} of {len(results)} runs pass ({skipped} skipped, "
          f"{len(results) - passed - skipped} fail); GPU: {'yes' if gpu else 'no'}")
    if missing:
        print(f"not in {opts.examples}: {', '.join(missing)}")

    opts.json.parent.mkdir(parents=True, exist_ok=True)
    opts.json.write_text(json.dumps({
        "ran_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "examples": "triton-inference-server/client src/python/examples",
        "model_repository": str(REPOSITORY.relative_to(ROOT)),
        "gpu": gpu,
        "summary": {"runs": len(results), "pass": passed, "skip": skipped, "fail": len(results) - passed - skipped},
        "missing_scripts": missing,
        "results": [asdict(r) for r in results],
    }, indent=1) + "\n")
    print(f"wrote {opts.json}")
    return 0 if passed + skipped == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
