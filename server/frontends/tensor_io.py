"""What both frontends do around a model call besides decoding: tensors in shared memory (read before,
written after), the classification extension, and the scheduling parameters (priority, timeout).

gRPC (:mod:`.grpc_codec`) and REST (:mod:`.rest_api`) decode their own wire formats, collect the
inputs that name a shared memory region as :class:`PendingInput`, and call these helpers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from modelyard.protos.tensors import DTYPES, TensorError, datatype_of, from_raw, to_raw
from modelyard.server.errors import InvalidInput
from modelyard.server.model_config import ModelConfig
from modelyard.server.shared_memory import REGION_PARAM, SHM_PARAMS, SIZE_PARAM, SharedMemoryRegistry, ShmRef
from modelyard.server.types import InferRequest, InferResponse

#: request parameters with a meaning to the scheduler (Triton's names)
PRIORITY_PARAM = "priority"
TIMEOUT_PARAM = "timeout"  # microseconds
CLASSIFICATION_PARAM = "classification"


@dataclass(slots=True)
class PendingInput:
    """An input whose bytes are in a shared memory region, to be read before the model runs."""

    name: str
    datatype: str
    shape: list[int]
    ref: ShmRef


@dataclass(slots=True)
class WrittenOutput:
    """An output the server wrote into a shared memory region instead of the response."""

    datatype: str
    shape: list[int]
    ref: ShmRef
    nbytes: int


def conform_output(arr: np.ndarray, cfg: ModelConfig | None, name: str) -> tuple[np.ndarray, str]:
    """Cast an output to the datatype its config declares (models often compute in float64).

    Object arrays (text, and classification results) stay BYTES whatever the declaration, and so does
    an output whose datatype is one of the spec's ``accept_datatypes``.
    """
    spec = cfg.output(name) if cfg is not None else None
    if (spec is not None and spec.datatype != "BYTES" and arr.dtype != object
            and not (spec.accept_datatypes and datatype_of(arr) in spec.accept_datatypes)):
        want = DTYPES[spec.datatype]
        if arr.dtype != want:
            arr = arr.astype(want)
        return arr, spec.datatype
    if arr.dtype.kind in ("U", "S"):
        flat = np.empty(arr.size, dtype=object)
        flat[:] = [x.encode("utf-8") if isinstance(x, str) else bytes(x) for x in arr.reshape(-1)]
        arr = flat.reshape(arr.shape)
    return arr, datatype_of(arr)


def apply_scheduling_params(req: InferRequest, time_remaining: float | None = None) -> None:
    """``priority`` and ``timeout`` (µs) request parameters, and the client's deadline, onto ``req``."""
    params = req.parameters
    priority = params.get(PRIORITY_PARAM)
    if priority is not None:
        if not isinstance(priority, int) or isinstance(priority, bool) or priority < 0:
            raise InvalidInput(f"parameter 'priority' must be a non-negative integer, got {priority!r}")
        req.priority = priority
    deadlines = []
    if time_remaining is not None:
        deadlines.append(time_remaining)
    timeout_us = params.get(TIMEOUT_PARAM)
    if timeout_us is not None:
        if not isinstance(timeout_us, int) or isinstance(timeout_us, bool) or timeout_us < 0:
            raise InvalidInput(f"parameter 'timeout' must be a non-negative integer of microseconds, got {timeout_us!r}")
        if timeout_us > 0:
            deadlines.append(timeout_us / 1e6)
    if deadlines:
        req.deadline = time.monotonic() + min(deadlines)


def shm_input(name: str, datatype: Any, shape: Any, params: dict[str, Any]) -> PendingInput | None:
    """The pending read of an input whose parameters name a region (None when they do not)."""
    ref = ShmRef.from_parameters(params, f"input '{name}'")
    if ref is None:
        return None
    if datatype not in DTYPES:
        raise InvalidInput(f"input '{name}': unknown datatype {datatype!r}")
    if not isinstance(shape, list) or any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape):
        raise InvalidInput(f"input '{name}': shape must be a list of non-negative integers, got {shape}")
    return PendingInput(name, datatype, shape, ref)


async def read_inputs(shm: SharedMemoryRegistry, req: InferRequest, pending: list[PendingInput]) -> None:
    """Copy every pending input out of its region (bounds checked) and decode it into ``req.inputs``."""
    for p in pending:
        if p.name in req.inputs:
            raise InvalidInput(f"input '{p.name}' given twice")
        raw = await shm.read(p.ref, f"input '{p.name}'")
        try:
            req.inputs[p.name] = from_raw(raw, p.datatype, p.shape, p.name)
        except TensorError as exc:
            raise InvalidInput(f"{exc} (from shared memory region '{p.ref.region}')") from None
        except (ValueError, MemoryError) as exc:
            raise InvalidInput(f"input '{p.name}': {exc}") from None


def output_refs(shm: SharedMemoryRegistry, req: InferRequest) -> dict[str, ShmRef]:
    """The requested outputs that go to shared memory, checked against their regions before computing."""
    refs: dict[str, ShmRef] = {}
    for name, params in req.output_parameters.items():
        if not any(k in params for k in SHM_PARAMS):
            continue
        what = f"output '{name}'"
        ref = ShmRef.from_parameters(params, what)
        if ref is None:
            continue
        if params.get(CLASSIFICATION_PARAM):
            raise InvalidInput(f"{what}: classification cannot be returned in shared memory")
        shm.get(ref.region, what).check(ref.offset, ref.byte_size, what)
        refs[name] = ref
    return refs


async def write_outputs(shm: SharedMemoryRegistry, resp: InferResponse, cfg: ModelConfig | None,
                        refs: dict[str, ShmRef]) -> dict[str, WrittenOutput]:
    """Write the outputs named in ``refs`` into their regions; what each response must then say of them."""
    written: dict[str, WrittenOutput] = {}
    for name, ref in refs.items():
        value = resp.outputs.get(name)
        if value is None:
            continue
        arr, datatype = conform_output(np.asarray(value), cfg, name)
        raw = to_raw(arr)
        await shm.write(ref, raw, f"output '{name}'")
        written[name] = WrittenOutput(datatype, list(arr.shape), ref, len(raw))
    return written


def shm_output_parameters(out: WrittenOutput) -> dict[str, Any]:
    return {REGION_PARAM: out.ref.region, SIZE_PARAM: out.nbytes}


def classification_count(req: InferRequest, name: str) -> int:
    """The top-k the client asked for on output ``name`` (0: not asked)."""
    params = req.output_parameters.get(name)
    if not params:
        return 0
    k = params.get(CLASSIFICATION_PARAM, 0)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise InvalidInput(f"output '{name}': parameter classification must be a non-negative integer, got {k!r}")
    return k


def classify(arr: np.ndarray, k: int, batched: bool, labels: list[str] | None = None) -> np.ndarray:
    """Triton's classification extension: the top ``k`` entries as BYTES ``"value:index"`` per row,
    ``"value:index:label"`` when the output has labels (``label_filename``)."""
    if arr.dtype == object:
        raise InvalidInput("classification needs a numeric output, got BYTES")
    rows = arr.reshape(arr.shape[0], -1) if batched and arr.ndim else arr.reshape(1, -1)
    k = min(k, rows.shape[1])
    order = np.argsort(-rows.astype(np.float64), axis=1, kind="stable")[:, :k]
    out = np.empty((rows.shape[0], k), dtype=object)
    for r in range(rows.shape[0]):
        out[r, :] = [(f"{float(rows[r, i]):f}:{int(i)}:{labels[i]}" if labels is not None and i < len(labels)
                      else f"{float(rows[r, i]):f}:{int(i)}").encode() for i in order[r]]
    return out if batched else out.reshape(k)


def apply_classification(req: InferRequest, resp: InferResponse, cfg: ModelConfig | None,
                         labels: dict[str, list[str]] | None = None) -> InferResponse:
    """Replace the outputs the client asked to classify by their top-k entries (with ``labels`` by output)."""
    if not req.output_parameters:
        return resp
    batched = bool(cfg is not None and cfg.max_batch_size > 0)
    changed = dict(resp.outputs)
    classified = False
    for name in resp.outputs:
        k = classification_count(req, name)
        if k:
            changed[name] = classify(np.asarray(resp.outputs[name]), k, batched, labels.get(name) if labels else None)
            classified = True
    if not classified:
        return resp
    return InferResponse(outputs=changed, parameters=resp.parameters, model=resp.model, version=resp.version,
                         id=resp.id, final=resp.final)
