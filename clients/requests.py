"""Building ``ModelInferRequest`` messages from numpy arrays (raw contents, the fast path)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from modelyard.protos import grpc_service_pb2 as pb
from modelyard.protos.params import ParamValue, set_parameter
from modelyard.protos.tensors import as_bytes_array, datatype_of, to_raw


def _as_array(value: object) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (str, bytes)):
        return as_bytes_array([value])
    arr = np.asarray(value)
    if arr.dtype.kind in ("U", "S"):
        return as_bytes_array(arr.reshape(-1).tolist(), arr.shape)
    return arr


def build_infer_request(
    model: str,
    inputs: Mapping[str, np.ndarray],
    *,
    outputs: Iterable[str] | None = None,
    version: str = "",
    parameters: Mapping[str, ParamValue] | None = None,
    request_id: str = "",
) -> pb.ModelInferRequest:
    """A request whose inputs travel as ``raw_input_contents``, one entry per input in order."""
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for name, value in inputs.items():
        arr = _as_array(value)
        request.inputs.add(name=name, datatype=datatype_of(arr), shape=arr.shape)
        request.raw_input_contents.append(to_raw(arr))
    for name in outputs or ():
        request.outputs.add(name=name)
    for key, val in (parameters or {}).items():
        set_parameter(request.parameters[key], val)
    return request
