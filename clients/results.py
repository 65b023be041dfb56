"""Decoded inference responses."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
import numpy as np

from modelyard.clients.errors import InferenceServerError
from modelyard.protos import grpc_service_pb2 as pb
from modelyard.protos.params import ParamValue, parameter_value
from modelyard.protos.tensors import from_contents, from_raw

#: response parameter a decoupled model sets on its last response
FINAL_RESPONSE_PARAM = "triton_final_response"


@dataclass(slots=True)
class InferResult:
    """One inference response: outputs as numpy arrays (BYTES as object arrays of ``bytes``).

    Numeric outputs are read-only views of the response bytes; ``.copy()`` one to modify it.
    """

    model: str
    version: str
    id: str
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    datatypes: dict[str, str] = field(default_factory=dict)
    parameters: dict[str, ParamValue | None] = field(default_factory=dict)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.outputs[name]

    def as_numpy(self, name: str) -> np.ndarray | None:
        """The output called ``name``, or None when the response does not carry it."""
        return self.outputs.get(name)

    @property
    def final(self) -> bool:
        """True on a decoupled model's last response (and on every non-decoupled response)."""
        return bool(self.parameters.get(FINAL_RESPONSE_PARAM, True))

    @classmethod
    def from_proto(cls, response: pb.ModelInferResponse) -> InferResult:
        """Decode outputs from ``raw_output_contents``, or typed contents when a server sends those."""
        result = cls(
            model=response.model_name,
            version=response.model_version,
            id=response.id,
            parameters={k: parameter_value(v) for k, v in response.parameters.items()},
        )
        raw = response.raw_output_contents
        for i, tensor in enumerate(response.outputs):
            if raw:
                if i >= len(raw):
                    raise ValueError(f"output '{tensor.name}' has no raw_output_contents entry")
                arr = from_raw(raw[i], tensor.datatype, tensor.shape, tensor.name)
            else:
                arr = from_contents(tensor.contents, tensor.datatype, tensor.shape, tensor.name)
            result.outputs[tensor.name] = arr
            result.datatypes[tensor.name] = tensor.datatype
        return result


def decode_result(response: pb.ModelInferResponse) -> InferResult:
    """:meth:`InferResult.from_proto`, with a malformed response reported as an InferenceServerError."""
    try:
        return InferResult.from_proto(response)
    except ValueError as exc:
        raise InferenceServerError(grpc.StatusCode.INTERNAL, f"malformed response from server: {exc}") from None


def decode_stream_response(message: pb.ModelStreamInferResponse) -> InferResult | None:
    """One stream message as a result; raises on an in-band error; None for an empty final marker."""
    if message.error_message:
        raise InferenceServerError.from_stream_message(message.error_message)
    result = decode_result(message.infer_response)
    if not result.outputs and result.final and FINAL_RESPONSE_PARAM in result.parameters:
        return None
    return result
