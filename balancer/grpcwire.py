"""gRPC on the wire, as far as a relay needs it: status codes, ``grpc-timeout``, status trailers.

Nothing here parses messages; these helpers read and write the few header fields the proxy acts on.
"""

from __future__ import annotations

from modelyard.balancer.h2.hpack import Headers, encode, encode_field

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
#: serialized grpc.health.v1.HealthCheckResponse{status: NOT_SERVING}
NOT_SERVING_RESPONSE = b"\x08\x02"

OK, CANCELLED, UNKNOWN, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED = 0, 1, 2, 4, 8
UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS = 12, 13, 14, 15
CODE_NAMES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
              "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
              "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")
#: codes that say the endpoint (not the request) is bad: outlier detection and the EWMA penalty
FAILURE_CODES = frozenset({UNAVAILABLE, INTERNAL, UNKNOWN, DATA_LOSS})

_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def default_unary_methods() -> set[str]:
    """Unary methods of the services we know (inference, health) from their descriptors."""
    from modelyard.protos import grpc_service_pb2

    out = {HEALTH_CHECK}
    for svc in grpc_service_pb2.DESCRIPTOR.services_by_name.values():
        for m in svc.methods:
            if not m.client_streaming and not m.server_streaming:
                out.add(f"/{svc.full_name}/{m.name}")
    return out


def parse_timeout(value: bytes) -> float | None:
    """``grpc-timeout`` (e.g. ``100m``) in seconds; None when malformed."""
    unit = _TIMEOUT_UNITS.get(value[-1:])
    digits = value[:-1]
    if unit is None or not digits.isdigit() or len(digits) > 8:
        return None
    return int(digits) * unit


def timeout_field(seconds: float) -> bytes:
    """An encoded ``grpc-timeout`` header field for ``seconds`` (at most 8 digits)."""
    us = max(1, int(seconds * 1e6))
    value = f"{us}u" if us < 100_000_000 else f"{max(1, int(seconds * 1e3))}m" if seconds < 99_999 else \
        f"{min(99_999_999, int(seconds))}S"
    return encode_field((b"grpc-timeout", value.encode()))


def percent_encode(message: str) -> bytes:
    """grpc-message encoding: printable ASCII except '%' as is, everything else %XX."""
    out = bytearray()
    for b in message.encode():
        if 0x20 <= b <= 0x7E and b != 0x25:
            out.append(b)
        else:
            out += b"%%%02X" % b
    return bytes(out)


def status_block(code: int, message: str, trailers_only: bool,
                 extra: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    fields = [(b"grpc-status", str(code).encode())]
    if message:
        fields.append((b"grpc-message", percent_encode(message)))
    fields.extend(extra)
    if trailers_only:
        fields = [(b":status", b"200"), (b"content-type", b"application/grpc"), *fields]
    return encode(tuple(fields))


def grpc_status(headers: Headers) -> int:
    for k, v in headers:
        if k == b"grpc-status":
            try:
                return int(v)
            except ValueError:
                return UNKNOWN
    return UNKNOWN


#: unary methods that change state: never hedged, never retried after a per-try timeout
_NOT_IDEMPOTENT = frozenset({"RepositoryModelLoad", "RepositoryModelUnload", "SystemSharedMemoryRegister",
                             "SystemSharedMemoryUnregister", "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister",
                             "TraceSetting", "LogSettings"})


def default_idempotent_methods() -> set[str]:
    """Unary methods safe to send twice (hedging): inference and every read of the inference service, health."""
    from modelyard.protos import grpc_service_pb2

    out = {HEALTH_CHECK}
    for svc in grpc_service_pb2.DESCRIPTOR.services_by_name.values():
        for m in svc.methods:
            if not m.client_streaming and not m.server_streaming and m.name not in _NOT_IDEMPOTENT:
                out.add(f"/{svc.full_name}/{m.name}")
    return out
