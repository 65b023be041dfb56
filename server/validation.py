"""Check a decoded request against the model's config: names, datatypes, shapes, batch size."""

from __future__ import annotations

from modelyard.protos.tensors import datatype_of
from modelyard.server.errors import InvalidInput
from modelyard.server.model_config import ModelConfig
from modelyard.server.types import InferRequest


def _shape_ok(expected: list[int], actual: tuple[int, ...]) -> bool:
    return len(expected) == len(actual) and all(e == -1 or e == a for e, a in zip(expected, actual, strict=True))


def validate_request(cfg: ModelConfig, req: InferRequest) -> None:
    """Raise InvalidInput naming the tensor and what was expected."""
    declared = {spec.name for spec in cfg.inputs}
    for name in req.inputs:
        if name not in declared:
            raise InvalidInput(f"unexpected input '{name}' for model '{cfg.name}'; inputs are {sorted(declared)}")
    batch: int | None = None
    for spec in cfg.inputs:
        arr = req.inputs.get(spec.name)
        if arr is None:
            if spec.optional:
                continue
            raise InvalidInput(f"missing input '{spec.name}' for model '{cfg.name}'")
        got = datatype_of(arr)
        if not spec.accepts(got):
            also = f" (or {', '.join(spec.accept_datatypes)})" if spec.accept_datatypes else ""
            raise InvalidInput(f"input '{spec.name}': expected datatype {spec.datatype}{also}, got {got}")
        shape = tuple(int(d) for d in arr.shape)
        if cfg.max_batch_size > 0:
            # The batch dimension is checked for every input, datatype-agnostic ones too: the
            # batcher counts rows by it, and a request of 0 rows must never reach it.
            if len(shape) == 0:
                raise InvalidInput(f"input '{spec.name}': expected a leading batch dimension, got shape []")
            b, rest = shape[0], shape[1:]
            if b < 1 or b > cfg.max_batch_size:
                raise InvalidInput(
                    f"input '{spec.name}': batch size {b} outside 1..max_batch_size ({cfg.max_batch_size})"
                )
            if batch is not None and b != batch:
                raise InvalidInput(f"input '{spec.name}': batch size {b} differs from other inputs ({batch})")
            batch = b
            if spec.dims is None:
                continue
            if not _shape_ok(spec.dims, rest):
                raise InvalidInput(f"input '{spec.name}': expected shape [-1, {', '.join(map(str, spec.dims))}], got {list(shape)}")
        elif spec.dims is not None and not _shape_ok(spec.dims, shape):
            raise InvalidInput(f"input '{spec.name}': expected shape {spec.dims}, got {list(shape)}")
    if req.outputs is not None and cfg.outputs:
        known = {spec.name for spec in cfg.outputs}
        for name in req.outputs:
            if name not in known:
                raise InvalidInput(f"unknown requested output '{name}' for model '{cfg.name}'; outputs are {sorted(known)}")
