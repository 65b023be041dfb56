"""The one exception the client raises, carrying the server's gRPC status."""

from __future__ import annotations

import grpc


class InferenceServerError(Exception):
    """A failed call: ``code`` is the gRPC status, ``message`` the server's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}" if message else code.name)
        self.code = code
        self.message = message

    @classmethod
    def from_rpc_error(cls, exc: grpc.RpcError) -> InferenceServerError:
        """Wrap a grpc error (sync or aio); both expose ``code()`` and ``details()``."""
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = exc.details() if hasattr(exc, "details") else str(exc)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "")

    @classmethod
    def from_stream_message(cls, text: str) -> InferenceServerError:
        """An in-band ``error_message``; modelyard writes it as ``"<CODE>: <message>"``."""
        head, sep, rest = text.partition(": ")
        code = grpc.StatusCode.__members__.get(head) if sep else None
        if code is None:
            return cls(grpc.StatusCode.UNKNOWN, text)
        return cls(code, rest)
