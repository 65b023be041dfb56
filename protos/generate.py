"""Regenerate the committed protobuf/gRPC modules from the .proto sources.

Run as ``python -m modelyard.protos.generate [OUT_DIR]`` (or ``make protos``).

Two rewrites follow protoc:
* generated modules import each other through the package path
  (``from modelyard.protos import model_config_pb2``), never as top-level modules;
* descriptors go into modelyard's own pool (``modelyard.protos._pool.POOL``), not
  protobuf's process-wide default one. Triton's client ships the very same
  ``inference.*`` messages under the same file names; in the default pool the two
  would collide the moment a process imports both (every interop test does).
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
SOURCES = ("model_config.proto", "grpc_service.proto", "modelyard_health.proto")
MODULES = ("model_config_pb2", "grpc_service_pb2", "modelyard_health_pb2")


def _rewrite(text: str) -> str:
    for mod in MODULES:
        text = re.sub(rf"^import {mod} as ", f"from modelyard.protos import {mod} as ", text, flags=re.M)
    if "_descriptor_pool.Default()" in text:
        text = text.replace("_descriptor_pool.Default()", "_POOL")
        text = text.replace(
            "from google.protobuf import descriptor_pool as _descriptor_pool\n",
            "from modelyard.protos._pool import POOL as _POOL\n",
        )
    return text


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on the sources and write the rewritten modules into ``out_dir``."""
    from grpc_tools import protoc  # imported late: only regeneration needs grpcio-tools

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_DIR}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(str(PROTO_DIR / s) for s in SOURCES),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed: " + " ".join(args))
        written = []
        for src in sorted(Path(tmp).iterdir()):
            if src.name == "model_config_pb2_grpc.py":  # no services in that file
                continue
            dst = out_dir / src.name
            dst.write_text(_rewrite(src.read_text()))
            written.append(dst)
    return written


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_DIR
    for path in generate(out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
