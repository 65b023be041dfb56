"""One exception hierarchy, each class carrying its gRPC status (``code``) and HTTP status (``http``).

The gRPC handlers (``frontends.grpc_api._unary``) and the REST middleware (``frontends.rest_api``)
turn them into responses through :func:`as_modelyard_error`, the one mapping: an invalid config
(:class:`modelyard.config.ConfigError`, the one config error of every component) is
INVALID_ARGUMENT; anything else that is not a ModelyardError becomes INTERNAL with the exception's
type and message, never a traceback.
"""

from __future__ import annotations

import grpc

from modelyard.config import ConfigError

__all__ = ["Cancelled", "ConfigError", "DeadlineExceeded", "InvalidConfig", "InvalidInput", "ModelExecutionError",
           "ModelNotFound", "ModelNotReady", "ModelyardError", "Overloaded", "Unsupported", "as_modelyard_error"]


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


class InvalidConfig(ModelyardError):
    """What a :class:`modelyard.config.ConfigError` becomes at the API: INVALID_ARGUMENT with every problem."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    http = 400


def as_modelyard_error(exc: BaseException) -> ModelyardError:
    """Wrap anything that is not already a ModelyardError as INTERNAL, keeping its message."""
    if isinstance(exc, ModelyardError):
        return exc
    if isinstance(exc, ConfigError):
        return InvalidConfig(exc.message)
    text = str(exc) or type(exc).__name__
    return ModelExecutionError(f"{type(exc).__name__}: {text}")
