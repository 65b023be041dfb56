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

__all__ = ["AlreadyExists", "Cancelled", "ConfigError", "DeadlineExceeded", "InvalidConfig", "InvalidInput",
           "ModelExecutionError", "ModelNotFound", "ModelNotReady", "ModelyardError", "NotFound", "Overloaded",
           "PayloadTooLarge", "PermissionDenied", "Unauthenticated", "Unsupported", "UnsupportedEncoding",
           "as_modelyard_error"]


class ModelyardError(Exception):
    """Base error; ``code`` is the gRPC status it maps to."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    http: int = 500
    #: when to try again, in ms (gRPC trailing metadata ``retry-after-ms``, HTTP ``Retry-After``); None: no hint
    retry_after_ms: int | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ModelyardError):
    """A request that does not fit the model: shape, datatype, size, missing input, bad bytes."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    http = 400


class UnsupportedEncoding(InvalidInput):
    """A request body in a ``Content-Encoding`` the server does not decode (REST only: 415)."""

    http = 415


class PayloadTooLarge(ModelyardError):
    """A message (or what it decompresses to) over ``--max-message-mb``."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http = 413


class NotFound(ModelyardError):
    """Something named by the request does not exist (a shared memory region...)."""

    code = grpc.StatusCode.NOT_FOUND
    http = 404


class AlreadyExists(ModelyardError):
    """Registering a name that is already registered (a shared memory region)."""

    code = grpc.StatusCode.ALREADY_EXISTS
    http = 409


class ModelNotFound(NotFound):
    """Unknown model or version."""


class ModelNotReady(ModelyardError):
    """The model exists but is loading, unloading or failed to load."""

    code = grpc.StatusCode.UNAVAILABLE
    http = 503


class Overloaded(ModelyardError):
    """Too many requests queued or in flight (for a model or the server), or a client over its rate limit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http = 429

    def __init__(self, message: str, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class Unauthenticated(ModelyardError):
    """No bearer token, or one the server does not know."""

    code = grpc.StatusCode.UNAUTHENTICATED
    http = 401


class PermissionDenied(ModelyardError):
    """A known caller without the right to this model or admin operation."""

    code = grpc.StatusCode.PERMISSION_DENIED
    http = 403


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
    """A protocol feature modelyard does not implement (tracing, log settings)."""

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
