"""Who may call what on ``modelyard serve``: bearer tokens, allow lists, per-client rate limits.

The admission logic (tokens, allow lists, buckets) is :mod:`modelyard.security.guard`; this module
makes it raise the server's errors and keeps the current caller for the code below:

- every call needs a known bearer token (UNAUTHENTICATED, HTTP 401, otherwise), except the kinds
  listed in ``auth.exempt``: ``health`` (ServerLive/Ready, ModelReady, grpc.health.v1,
  modelyard.Health, ``/v2/health/*``, ``/health``, model ``/ready``), ``reflection``, ``metrics``;
- a call that names a model needs the model in the token's ``models`` globs, and an admin
  operation (``load``, ``unload``, ``shared_memory``) in its ``admin`` list (PERMISSION_DENIED, 403);
  the check comes before the model is looked up, so a token learns nothing of models it may not use;
- lists of models (repository index, statistics, ``/v1/models``) show only the models the token may use;
- every call but health checks and metrics takes a token from its client's bucket (RESOURCE_EXHAUSTED,
  429, with a retry-after hint, when empty); the client is the token's name, else the peer's address.

The frontends call :meth:`Guard.admit` once per call (gRPC: ``grpc_api._unary``/``_streaming``;
REST: :func:`~modelyard.server.frontends.rest_api.guard_middleware`), which puts the caller in
:data:`CALLER` for the code below to check models against (:func:`require_model`, :func:`visible`).
With neither tokens nor rate limits configured there is no Guard and nothing is checked.
"""

from __future__ import annotations

from contextvars import ContextVar

from modelyard.security import guard as _guard
from modelyard.security.config import EXEMPTABLE, HEALTH, METRICS, REFLECTION, AuthConfig, RateLimitConfig
from modelyard.security.guard import ADMIN_OPERATIONS, Caller, peer_host
from modelyard.security.rules import SERVER
from modelyard.server import errors
from modelyard.server.metrics import ServerMetrics

__all__ = ["ADMIN_OPERATIONS", "CALLER", "EXEMPTABLE", "HEALTH", "METRICS", "REFLECTION", "SERVER", "Caller",
           "Guard", "peer_host", "require_model", "visible"]


class Guard(_guard.Guard):
    """The server's guard: refusals are the server's errors (gRPC status + HTTP status + retry-after)."""

    Unauthenticated = errors.Unauthenticated
    PermissionDenied = errors.PermissionDenied
    RateLimited = errors.Overloaded

    def __init__(self, auth: AuthConfig, limits: RateLimitConfig, metrics: ServerMetrics | None = None) -> None:
        super().__init__(auth, limits, metrics.refused if metrics is not None else None)


#: the caller of the call being handled (set by the frontends; None when there is no Guard or the call is exempt)
CALLER: ContextVar[Caller | None] = ContextVar("modelyard_caller", default=None)


def require_model(model: str) -> None:
    """PermissionDenied unless the current caller may use ``model`` (no-op without a Guard)."""
    caller = CALLER.get()
    if caller is not None:
        caller.check_model(model)


def visible(model: str) -> bool:
    """Whether ``model`` belongs in a list shown to the current caller."""
    caller = CALLER.get()
    return caller is None or caller.can_see(model)
