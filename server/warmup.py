"""Warmup samples from ``model_warmup``: run before a version reports READY."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from modelyard.protos.tensors import CONFIG_TYPES, DTYPES, as_bytes_array
from modelyard.server.errors import ConfigError
from modelyard.server.model_config import ModelConfig, WarmupSample
from modelyard.server.types import InferRequest


def _array(name: str, spec: dict[str, Any], batch: int, cfg: ModelConfig, version_dir: Path, rng: np.random.Generator) -> np.ndarray:
    raw_type = str(spec.get("data_type", spec.get("datatype", "FP32"))).upper()
    datatype = CONFIG_TYPES.get(raw_type, raw_type)
    if datatype not in DTYPES:
        raise ConfigError([f"model_warmup.inputs.{name}.data_type: unknown {raw_type!r}"], cfg.name)
    dims = [int(d) for d in spec.get("dims", [])]
    shape = ([batch] if cfg.max_batch_size > 0 else []) + dims
    count = int(np.prod(shape)) if shape else 1
    if "value" in spec:  # modelyard extension: a literal value repeated to fill the shape
        value = spec["value"]
        if datatype == "BYTES":
            return as_bytes_array([value] * count, shape)
        return np.full(shape, value, dtype=DTYPES[datatype])
    if spec.get("input_data_file"):
        model_dir = version_dir.parent.resolve()
        path = (model_dir / str(spec["input_data_file"])).resolve()
        if not path.is_relative_to(model_dir):
            raise ConfigError([f"model_warmup.inputs.{name}.input_data_file: {path} is outside the model directory"], cfg.name)
        data = path.read_bytes()
        if datatype == "BYTES":
            return as_bytes_array([data] * count, shape)
        return np.frombuffer(data, dtype=DTYPES[datatype])[:count].reshape(shape)
    if datatype == "BYTES":
        return as_bytes_array([b"warmup"] * count, shape)
    if spec.get("random_data"):
        if DTYPES[datatype].kind == "f":
            return rng.random(shape).astype(DTYPES[datatype])
        if datatype == "BOOL":
            return rng.integers(0, 2, shape).astype(bool)
        return rng.integers(0, 100, shape).astype(DTYPES[datatype])
    return np.zeros(shape, dtype=DTYPES[datatype])


def warmup_requests(cfg: ModelConfig, sample: WarmupSample, version_dir: Path, version: str) -> list[InferRequest]:
    """The ``count`` requests one warmup sample stands for."""
    rng = np.random.default_rng(0)
    inputs = {n: _array(n, spec, sample.batch_size, cfg, version_dir, rng) for n, spec in sample.inputs.items()}
    return [InferRequest(model=cfg.name, version=version, inputs=inputs, id=f"warmup:{sample.name}") for _ in range(sample.count)]
