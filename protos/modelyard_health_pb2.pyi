from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HealthCheckRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthCheckResponse(_message.Message):
    __slots__ = ("state", "reasons", "detail_json")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        UNKNOWN: _ClassVar[HealthCheckResponse.State]
        HEALTHY: _ClassVar[HealthCheckResponse.State]
        DEGRADED: _ClassVar[HealthCheckResponse.State]
        UNHEALTHY: _ClassVar[HealthCheckResponse.State]
    UNKNOWN: HealthCheckResponse.State
    HEALTHY: HealthCheckResponse.State
    DEGRADED: HealthCheckResponse.State
    UNHEALTHY: HealthCheckResponse.State
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_JSON_FIELD_NUMBER: _ClassVar[int]
    state: HealthCheckResponse.State
    reasons: _containers.RepeatedScalarFieldContainer[str]
    detail_json: str
    def __init__(self, state: _Optional[_Union[HealthCheckResponse.State, str]] = ..., reasons: _Optional[_Iterable[str]] = ..., detail_json: _Optional[str] = ...) -> None: ...
