"""``InferParameter`` <-> python values, shared by the server and the clients."""

from __future__ import annotations

from modelyard.protos import grpc_service_pb2 as pb

#: what a request, input or output parameter may hold
ParamValue = bool | int | float | str

_INT64_MAX = 2**63 - 1


def set_parameter(param: pb.InferParameter, value: ParamValue) -> None:
    """Store a python value in the matching ``InferParameter`` oneof field."""
    # bool first: it is also an int.
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        if value > _INT64_MAX:
            param.uint64_param = value
        else:
            param.int64_param = value
    elif isinstance(value, float):
        param.double_param = value
    elif isinstance(value, str):
        param.string_param = value
    else:
        raise TypeError(f"parameter values must be bool, int, float or str, got {type(value).__name__}")


def parameter_value(param: pb.InferParameter) -> ParamValue | None:
    """The python value an ``InferParameter`` holds (None when unset)."""
    which = param.WhichOneof("parameter_choice")
    return getattr(param, which) if which else None
