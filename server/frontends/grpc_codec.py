"""Protobuf <-> :mod:`modelyard.server.types` translation for the gRPC servicer."""

from __future__ import annotations

import numpy as np

from modelyard.protos import grpc_service_pb2 as pb
from modelyard.protos.params import parameter_value, set_parameter
from modelyard.protos.tensors import TensorError, from_contents, from_raw, to_raw
from modelyard.server.errors import InvalidInput
from modelyard.server.frontends.tensor_io import (
    PRIORITY_PARAM,
    TIMEOUT_PARAM,
    PendingInput,
    WrittenOutput,
    apply_scheduling_params,
    conform_output,
    shm_input,
    shm_output_parameters,
)
from modelyard.server.model_config import ModelConfig
from modelyard.server.types import InferRequest, InferResponse

__all__ = ["PRIORITY_PARAM", "TIMEOUT_PARAM", "conform_output", "decode_request", "encode_response"]


def decode_request(msg: pb.ModelInferRequest, time_remaining: float | None = None,
                   pending: list[PendingInput] | None = None, max_elements: int | None = None) -> InferRequest:
    """Decode a ModelInferRequest; raises InvalidInput naming the tensor at fault.

    A shape is checked before anything is allocated for it (:func:`~modelyard.protos.tensors.check_shape`:
    no negative dimension, no element count past int64 or ``max_elements``, the message size limit).

    Inputs whose parameters name a shared memory region are appended to ``pending`` (read by
    :func:`.tensor_io.read_inputs`); without ``pending`` such a request is refused.
    ``raw_input_contents`` then holds one entry per other input, in order (as tritonclient sends).
    """
    raw = msg.raw_input_contents
    inputs: dict[str, np.ndarray] = {}
    name = ""
    try:
        shm_flags = []
        seen: set[str] = set()
        for i, tensor in enumerate(msg.inputs):
            name = tensor.name
            if not name:
                raise InvalidInput(f"input #{i} has no name")
            if name in seen:
                raise InvalidInput(f"input '{name}' given twice")
            seen.add(name)
            ref = None
            if tensor.parameters and any(k.startswith("shared_memory_") for k in tensor.parameters):
                params = {k: parameter_value(v) for k, v in tensor.parameters.items()}
                ref = shm_input(name, tensor.datatype, list(tensor.shape), params)
            shm_flags.append(ref is not None)
            if ref is not None:
                if pending is None:
                    raise InvalidInput(f"input '{name}': shared memory is not supported on this call")
                if tensor.HasField("contents"):
                    raise InvalidInput(f"input '{name}': both shared_memory_region and contents are set; use one")
                pending.append(ref)
        if raw:
            typed = next((t.name for t in msg.inputs if t.HasField("contents")), None)
            if typed is not None:  # Triton's text, which its clients' scripts look for
                raise InvalidInput(f"contents field must not be specified when using raw_input_contents for "
                                   f"'{typed}' for model '{msg.model_name}'")
        n_data = shm_flags.count(False)
        if raw and len(raw) != n_data:
            raise InvalidInput(
                f"raw_input_contents has {len(raw)} entries for {n_data} inputs: send raw data for every input "
                "(except those in shared memory) or none"
            )
        r = 0
        for tensor, in_shm in zip(msg.inputs, shm_flags, strict=True):
            name = tensor.name
            if in_shm:
                continue
            if raw:
                inputs[name] = from_raw(raw[r], tensor.datatype, tensor.shape, name, max_elements)
                r += 1
            elif tensor.HasField("contents"):
                inputs[name] = from_contents(tensor.contents, tensor.datatype, tensor.shape, name, max_elements)
            else:
                raise InvalidInput(f"input '{name}': no data (neither raw_input_contents, contents nor shared memory)")
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
    if params or time_remaining is not None:
        apply_scheduling_params(req, time_remaining)
    return req


def encode_response(resp: InferResponse, cfg: ModelConfig | None = None, *, decoupled: bool = False,
                    written: dict[str, WrittenOutput] | None = None) -> pb.ModelInferResponse:
    """Outputs go in raw_output_contents (the only place tritonclient reads).

    An output written to shared memory keeps its place with an empty entry, so the entries
    still line up with ``outputs``; its parameters name the region and the bytes written.
    """
    msg = pb.ModelInferResponse(model_name=resp.model, model_version=resp.version, id=resp.id)
    for name, value in resp.outputs.items():
        done = written.get(name) if written else None
        if done is not None:
            out = msg.outputs.add(name=name, datatype=done.datatype, shape=done.shape)
            for key, pvalue in shm_output_parameters(done).items():
                set_parameter(out.parameters[key], pvalue)
            msg.raw_output_contents.append(b"")
            continue
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
