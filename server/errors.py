"""One exception hierarchy, each class carrying its gRPC status; one place maps them.

Servicers and REST handlers never format tracebacks for clients: they call
:func:`grpc_code` / :func:`http_status` on a :class:`ModelyardError`, and anything
else becomes INTERNAL with the exception's message.
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
