"""Where an instance runs: ``cpu`` or ``cuda:N``, decided from its instance group."""

from __future__ import annotations

from modelyard.server.errors import ConfigError
from modelyard.server.model_config import InstanceGroup


def cuda_device_count() -> int:
    """Number of usable CUDA devices (0 without torch or without CUDA)."""
    try:
        import torch
    except ImportError:
        return 0
    try:
        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except Exception:  # a broken driver counts as no GPU
        return 0


def resolve_devices(model: str, groups: list[InstanceGroup]) -> list[str]:
    """One device string per instance, in instance order.

    GPU instances are spread round-robin over ``gpus`` (all visible GPUs when empty);
    a GPU group on a machine without CUDA is a load error, AUTO falls back to CPU.
    """
    devices: list[str] = []
    n_cuda: int | None = None
    for i, group in enumerate(groups):
        if group.kind == "CPU":
            devices.extend(["cpu"] * group.count)
            continue
        if n_cuda is None:
            n_cuda = cuda_device_count()
        if n_cuda == 0:
            if group.kind == "AUTO":
                devices.extend(["cpu"] * group.count)
                continue
            raise ConfigError(
                [f"instance_group[{i}].kind: GPU requested but no CUDA device is available "
                 "(torch with CUDA is needed; use kind: AUTO to fall back to CPU)"],
                f"model {model!r}",
            )
        gpus = group.gpus or list(range(n_cuda))
        missing = [g for g in gpus if g >= n_cuda]
        if missing:
            raise ConfigError([f"instance_group[{i}].gpus: {missing} not present ({n_cuda} visible)"], f"model {model!r}")
        devices.extend(f"cuda:{gpus[k % len(gpus)]}" for k in range(group.count))
    return devices
