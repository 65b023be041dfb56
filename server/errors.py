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
           "LoadFailed", "ModelControlDisabled", "ModelExecutionError", "ModelNotFound", "ModelNotReady",
           "ModelyardError", "NotFound", "Overloaded", "PayloadTooLarge", "PermissionDenied", "Unauthenticated",
           "Unsupported", "UnsupportedEncoding", "as_modelyard_error", "failed_to_load", "model_version",
           "no_available_versions", "unknown_model", "unknown_version", "version_not_ready"]


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


class LoadFailed(ModelyardError):
    """A model's code (or runtime) failed while loading: INVALID_ARGUMENT / 400, as Triton answers it."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    http = 400


class ModelControlDisabled(ModelyardError):
    """Load / unload asked of a server whose model control mode is ``none`` or ``poll`` (Triton: UNAVAILABLE)."""

    code = grpc.StatusCode.UNAVAILABLE
    http = 503


# ---------------------------------------------------------------------- Triton's texts
# The wording clients (tritonclient, Triton's own tests) match on, from triton-inference-server/core
# src/model_lifecycle.cc (GetModel), src/model_repository_manager/model_repository_manager.cc
# (LoadUnloadModel(s)) and triton-inference-server/server src/common.cc (GetModelVersionFromString).
# The same exception -- so the same gRPC status and HTTP status -- on both protocols.

#: refused load / unload outside ``explicit`` mode (Triton says "polling" for mode none too)
CONTROL_DISABLED = "explicit model load / unload is not allowed if polling is enabled"


def unknown_model(name: str) -> ModelNotFound:
    return ModelNotFound(f"Request for unknown model: '{name}' is not found")


def unknown_version(name: str, version: int | str) -> ModelNotFound:
    return ModelNotFound(f"Request for unknown model: '{name}' version {version} is not found")


def no_available_versions(name: str, reason: str = "") -> ModelNotReady:
    """A known model with no ready version (failed to load, loading). Triton answers NOT_FOUND; modelyard keeps
    UNAVAILABLE so that a balancer retries the request on another replica."""
    detail = f" (failed to load: {reason})" if reason else ""
    return ModelNotReady(f"Request for unknown model: '{name}' has no available versions{detail}")


def version_not_ready(name: str, version: int | str) -> ModelNotReady:
    return ModelNotReady(f"Request for unknown model: '{name}' version {version} is not at ready state")


def model_version(text: str) -> int | None:
    """A request's version string as Triton reads it: "" = latest (None), else an integer >= 0."""
    if not text:
        return None
    body = text.strip()
    digits = body[1:] if body[:1] in "+-" else body
    if not (digits.isascii() and digits.isdigit()):
        raise InvalidInput(f"failed to get model version from specified version string '{text}' (details: stol), "
                           "version should be an integral value > 0")
    value = int(body)
    if value < 0:
        raise InvalidInput(f"invalid model version specified '{text}' , version should be an integral value > 0")
    return value


def failed_to_load(name: str, detail: str = "", error: type[ModelyardError] = InvalidInput) -> ModelyardError:
    """Triton's answer when a model cannot be read from the repository (missing, bad config, bad override):
    ``failed to load '<name>', failed to poll from model repository``; modelyard adds the reason, which
    Triton only logs."""
    return error(f"failed to load '{name}', failed to poll from model repository" + (f": {detail}" if detail else ""))


def as_modelyard_error(exc: BaseException) -> ModelyardError:
    """Wrap anything that is not already a ModelyardError as INTERNAL, keeping its message."""
    if isinstance(exc, ModelyardError):
        return exc
    if isinstance(exc, ConfigError):
        return InvalidConfig(exc.message)
    text = str(exc) or type(exc).__name__
    return ModelExecutionError(f"{type(exc).__name__}: {text}")
