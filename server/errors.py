"""One exception hierarchy, each class carrying its gRPC status (``code``) and HTTP status (``http``).

The gRPC handlers (``grpc_service._unary``) and the REST middleware (``http_app.errors_middleware``)
are the two places that turn them into responses; anything that is not a ModelyardError becomes
INTERNAL with the exception's type and message (:func:`as_modelyard_error`), never a traceback.
"""

from __future__ import annotations

import grpc


class ModelyardError(Exception):
    """Base error; ``code`` is the gRPC status it maps to."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    http: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ModelyardError):
    """A request that does not fit the model: shape, datatype, size, missing input, bad bytes."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    http = 400


class ModelNotFound(ModelyardError):
    """Unknown model or version."""

    code = grpc.StatusCode.NOT_FOUND
    http = 404


class ModelNotReady(ModelyardError):
    """The model exists but is loading, unloading or failed to load."""

    code = grpc.StatusCode.UNAVAILABLE
    http = 503


class Overloaded(ModelyardError):
    """Too many requests queued or in flight for a model."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http = 429


class DeadlineExceeded(ModelyardError):
    """The request's timeout passed before it could be computed."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    http = 504


class Cancelled(ModelyardError):
    """The client went away."""

    code = grpc.StatusCode.CANCELLED
    http = 499


class ModelExecutionError(ModelyardError):
    """The model's own code raised; the message is passed through."""

    code = grpc.StatusCode.INTERNAL
    http = 500


class Unsupported(ModelyardError):
    """A protocol feature modelyard does not implement (shared memory, tracing...)."""

    code = grpc.StatusCode.UNIMPLEMENTED
    http = 501


class ConfigError(ModelyardError):
    """A model configuration that does not validate; lists every problem with its field path."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    http = 400

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


def as_modelyard_error(exc: BaseException) -> ModelyardError:
    """Wrap anything that is not already a ModelyardError as INTERNAL, keeping its message."""
    if isinstance(exc, ModelyardError):
        return exc
    text = str(exc) or type(exc).__name__
    return ModelExecutionError(f"{type(exc).__name__}: {text}")
