"""How well the server is doing: ``healthy``, ``degraded`` or ``unhealthy``, with the reasons.

Readiness stays the protocol's (ServerReady, ``/v2/health/ready``, grpc.health.v1): it says
whether to send traffic. This is the operator's view, served as ``GET /health`` (JSON; 503 only
when unhealthy) and as the gRPC method ``modelyard.Health/Check``:

* **unhealthy**: not started yet, shutting down, or no model version is READY;
* **degraded**: serving, but a model failed to load or a version is not READY (loading,
  unloading), a model's queue holds more than ``health_queue_depth`` requests or is more than
  80% of its ``max_queue_size``, or a GPU's memory is more than ``health_gpu_memory`` used
  (checked only where CUDA is already in use by this process);
* **healthy** otherwise.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from modelyard.server.model import READY
from modelyard.server.repository import ModelRepository

HEALTHY, DEGRADED, UNHEALTHY = "healthy", "degraded", "unhealthy"
#: a bounded queue this full (fraction of max_queue_size) degrades health
QUEUE_FULL_FRACTION = 0.8


@dataclass(slots=True)
class HealthReport:
    status: str
    reasons: list[str] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"status": self.status, "reasons": self.reasons, **self.detail}


def gpu_memory() -> list[dict[str, Any]]:
    """Used memory per CUDA device, where this process already uses CUDA (never initialises it)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return []
    try:
        if not torch.cuda.is_initialized():
            return []
        out = []
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            out.append({"device": f"cuda:{i}", "used_bytes": int(total - free), "total_bytes": int(total),
                        "used_fraction": round((total - free) / total, 4) if total else 0.0})
        return out
    except Exception as exc:  # a broken driver must not break the health endpoint
        return [{"device": "cuda", "error": f"{type(exc).__name__}: {exc}"}]


def assess(repo: ModelRepository, *, started: bool, shutting_down: bool, queue_depth_limit: int,
           gpu_memory_limit: float, gpus: list[dict[str, Any]] | None = None) -> HealthReport:
    """The health state of a server over ``repo`` (pure but for reading the repository and GPUs)."""
    unhealthy: list[str] = []
    degraded: list[str] = []
    if not started:
        unhealthy.append("the server is starting")
    if shutting_down:
        unhealthy.append("the server is shutting down")
    models: dict[str, Any] = {}
    ready_versions = 0
    for name, reason in sorted(repo.failed.items()):
        models[name] = {"state": "UNAVAILABLE", "reason": reason, "versions": {}}
        degraded.append(f"model '{name}' is unavailable: {reason}")
    for name, versions in sorted(repo.models.items()):
        entry: dict[str, Any] = {"state": READY, "versions": {}}
        for v, mv in sorted(versions.items(), key=lambda kv: int(kv[0])):
            depth = mv.scheduler.queue_depth() if mv.scheduler is not None else 0
            entry["versions"][v] = {"state": mv.state, "queue_depth": depth, "inflight": mv.inflight}
            if mv.state != READY:
                entry["state"] = mv.state
                degraded.append(f"model '{name}' version {v} is {mv.state}")
                continue
            ready_versions += 1
            if queue_depth_limit and depth > queue_depth_limit:
                degraded.append(f"model '{name}' version {v}: queue depth {depth} > {queue_depth_limit}")
            db = mv.config.dynamic_batching
            if db is not None and db.max_queue_size and depth >= QUEUE_FULL_FRACTION * db.max_queue_size:
                degraded.append(f"model '{name}' version {v}: queue depth {depth} is "
                                f"{depth / db.max_queue_size:.0%} of max_queue_size {db.max_queue_size}")
        models[name] = entry
    if started and not shutting_down and ready_versions == 0:
        unhealthy.append("no model is available")
    gpus = gpu_memory() if gpus is None else gpus
    for g in gpus:
        if "error" in g:
            degraded.append(f"GPU memory unknown: {g['error']}")
        elif g["used_fraction"] > gpu_memory_limit:
            degraded.append(f"{g['device']} memory {g['used_fraction']:.0%} used > {gpu_memory_limit:.0%}")
    status = UNHEALTHY if unhealthy else DEGRADED if degraded else HEALTHY
    detail = {"models": models, "gpus": gpus,
              "thresholds": {"queue_depth": queue_depth_limit, "gpu_memory": gpu_memory_limit}}
    return HealthReport(status, unhealthy + degraded, detail)
