"""Protobuf <-> :mod:`modelyard.server.types` translation for the gRPC servicer."""

from __future__ import annotations

import time

import numpy as np

from modelyard.protos import grpc_service_pb2 as pb
from modelyard.protos.params import parameter_value, set_parameter
from modelyard.protos.tensors import DTYPES, TensorError, datatype_of, from_contents, from_raw, to_raw
from modelyard.server.errors import InvalidInput
from modelyard.server.model_config import ANY, ModelConfig
from modelyard.server.types import InferRequest, InferResponse

#: request parameters with a meaning to the scheduler (Triton's names)
PRIORITY_PARAM = "priority"
TIMEOUT_PARAM = "timeout"  # microseconds


def decode_request(msg: pb.ModelInferRequest, time_remaining: float | None = None) -> InferRequest:
    """Decode a ModelInferRequest; raises InvalidInput naming the tensor at fault."""
    raw = msg.raw_input_contents
    n_inputs = len(msg.inputs)
    if raw and len(raw) != n_inputs:
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {n_inputs} inputs: send raw data for every input or none"
        )
    inputs: dict[str, np.ndarray] = {}
    try:
        for i, tensor in enumerate(msg.inputs):
            name = tensor.name
            if not name:
                raise InvalidInput(f"input #{i} has no name")
            if name in inputs:
                raise InvalidInput(f"input '{name}' given twice")
            if raw:
                inputs[name] = from_raw(raw[i], tensor.datatype, tensor.shape, name)
            elif tensor.HasField("contents"):
                inputs[name] = from_contents(tensor.contents, tensor.datatype, tensor.shape, name)
            else:
                raise InvalidInput(f"input '{name}': no data (neither raw_input_contents nor contents)")
    except TensorError as exc:
        raise InvalidInput(str(exc)) from None
    except (ValueError, MemoryError) as exc:  # numpy: too many dims, too big to allocate...
        raise InvalidInput(f"input '{name}': {exc}") from None
    params = {k: parameter_value(v) for k, v in msg.parameters.items()} if msg.parameters else {}
    req = InferRequest(model=msg.model_name, inputs=inputs, version=msg.model_version, id=msg.id, parameters=params)
    if msg.outputs:
        req.outputs = [o.name for o in msg.outputs]
        req.output_parameters = {
            o.name: {k: parameter_value(v) for k, v in o.parameters.items()} for o in msg.outputs if o.parameters
        }
    if not params and time_remaining is None:
        return req
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
    return req


def conform_output(arr: np.ndarray, cfg: ModelConfig | None, name: str) -> tuple[np.ndarray, str]:
    """Cast an output to the datatype its config declares (models often compute in float64)."""
    spec = cfg.output(name) if cfg is not None else None
    if spec is not None and spec.datatype not in (ANY, "BYTES"):
        want = DTYPES[spec.datatype]
        if arr.dtype != want:
            arr = arr.astype(want)
        return arr, spec.datatype
    if arr.dtype.kind in ("U", "S"):
        flat = np.empty(arr.size, dtype=object)
        flat[:] = [x.encode("utf-8") if isinstance(x, str) else bytes(x) for x in arr.reshape(-1)]
        arr = flat.reshape(arr.shape)
    return arr, datatype_of(arr)


def encode_response(resp: InferResponse, cfg: ModelConfig | None = None, *, decoupled: bool = False) -> pb.ModelInferResponse:
    """Outputs always go in raw_output_contents (the only place tritonclient reads)."""
    msg = pb.ModelInferResponse(model_name=resp.model, model_version=resp.version, id=resp.id)
    for name, value in resp.outputs.items():
        arr, datatype = conform_output(np.asarray(value) if not isinstance(value, np.ndarray) else value, cfg, name)
        msg.outputs.add(name=name, datatype=datatype, shape=arr.shape)
        msg.raw_output_contents.append(to_raw(arr))
    for key, value in resp.parameters.items():
        if hasattr(value, "item"):  # numpy scalars from model code
            value = value.item()
        set_parameter(msg.parameters[key], value if isinstance(value, bool | int | float | str) else str(value))
    if decoupled:
        msg.parameters["triton_final_response"].bool_param = resp.final
    return msg
