"""The one exception the client raises, carrying the server's gRPC status."""

from __future__ import annotations

import grpc


class InferenceServerError(Exception):
    """A failed call: ``code`` is the gRPC status, ``message`` the server's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{code.name}: {message}" if message else code.name)
        self.code = code
        self.message = message
        #: seconds the server asked to wait before trying again (its ``retry-after-ms`` trailer), if any
        self.retry_after = retry_after

    @classmethod
    def from_rpc_error(cls, exc: grpc.RpcError) -> InferenceServerError:
        """Wrap a grpc error (sync or aio); both expose ``code()``, ``details()`` and ``trailing_metadata()``."""
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = exc.details() if hasattr(exc, "details") else str(exc)
        retry_after = None
        trailers = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
        for key, value in trailers or ():
            if key == "retry-after-ms":
                try:
                    retry_after = int(value) / 1000.0
                except (TypeError, ValueError):
                    pass
        return cls(code or grpc.StatusCode.UNKNOWN, details or "", retry_after)

    @classmethod
    def from_stream_message(cls, text: str) -> InferenceServerError:
        """An in-band ``error_message``; modelyard writes it as ``"<CODE>: <message>"``."""
        head, sep, rest = text.partition(": ")
        code = grpc.StatusCode.__members__.get(head) if sep else None
        if code is None:
            return cls(grpc.StatusCode.UNKNOWN, text)
        return cls(code, rest)
