"""Who may call what on ``modelyard serve``: bearer tokens, allow lists, per-client rate limits.

The protocol-independent parts (token tables, constant-time lookup, token buckets) are
:mod:`modelyard.security`; this module holds the server's rules and raises the server's errors:

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

import logging
import math
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass

from modelyard.security.config import EXEMPTABLE, HEALTH, METRICS, REFLECTION, AuthConfig, RateLimitConfig
from modelyard.security.files import LoadError, Reloadable
from modelyard.security.ratelimit import TokenBuckets
from modelyard.security.tokens import Principal, TokenTable, bearer_token, load_env, parse_document
from modelyard.server.errors import Overloaded, PermissionDenied, Unauthenticated
from modelyard.server.metrics import ServerMetrics

__all__ = ["ADMIN_OPERATIONS", "CALLER", "EXEMPTABLE", "HEALTH", "METRICS", "REFLECTION", "SERVER", "Caller",
           "Guard", "require_model", "visible"]

log = logging.getLogger("modelyard.server")

#: a call that needs only a known token (server metadata, lists, OpenAI routes before their model is known)
SERVER = "server"
#: the admin operations a token may be given: repository load and unload, system shared memory
#: (register, unregister, status)
ADMIN_OPERATIONS = ("load", "unload", "shared_memory")


@dataclass(slots=True)
class Caller:
    """Who is making the current call (None principal: authentication is off) and their client key."""

    guard: Guard
    principal: Principal | None
    client: str

    def check_model(self, model: str) -> None:
        p = self.principal
        if p is not None and not p.may_use(model):
            self.guard.count("permission_denied")
            raise PermissionDenied(f"token '{p.name}' may not use model '{model}'")

    def check_admin(self, operation: str) -> None:
        p = self.principal
        if p is not None and not p.may(operation):
            self.guard.count("permission_denied")
            allowed = ", ".join(sorted(p.admin)) or "none"
            raise PermissionDenied(f"token '{p.name}' may not run admin operation '{operation}' "
                                   f"(its admin operations: {allowed})")

    def can_see(self, model: str) -> bool:
        return self.principal is None or self.principal.may_use(model)

    def take(self) -> None:
        """One request from this client's bucket, or Overloaded with the time until its next token."""
        buckets = self.guard.buckets
        if buckets is None:
            return
        p = self.principal
        if p is None or p.rps is None:
            wait = buckets.take(self.client)
            rps = buckets.rps
        else:
            rps = p.rps
            wait = buckets.take(self.client, rps, p.burst if p.burst is not None else max(1.0, rps))
        if wait:
            self.guard.count("rate_limited")
            ms = max(1, math.ceil(wait * 1000))
            raise Overloaded(f"client '{self.client}' is over its rate limit ({rps:g} requests/s); "
                             f"retry after {ms} ms", ms)


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


def peer_host(peer: str) -> str:
    """The address part of a gRPC peer (``ipv4:10.0.0.7:51234`` -> ``10.0.0.7``) or of ``host:port``."""
    kind, sep, rest = peer.partition(":")
    if sep and kind in ("ipv4", "ipv6", "unix", "unix-abstract"):
        peer = rest
        if kind.startswith("unix"):
            return peer
    host, sep, port = peer.rpartition(":")
    if sep and port.isdigit():
        peer = host
    return peer.strip("[]")


class Guard:
    """The server's tokens, exemptions and rate limiter. Reads the tokens file: build it in a worker thread."""

    def __init__(self, auth: AuthConfig, limits: RateLimitConfig, metrics: ServerMetrics | None = None) -> None:
        self.auth_on = auth.enabled
        self.exempt = frozenset(auth.exempt)
        # with tokens, a token's own rate_limit applies even when there is no default limit (rps 0)
        self.buckets = (TokenBuckets(limits.rps, limits.bucket, limits.max_clients)
                        if limits.enabled or auth.enabled else None)
        self._refused = metrics.refused if metrics is not None else None
        self._env = load_env(auth.tokens_env, ADMIN_OPERATIONS) if auth.tokens_env else TokenTable()
        self.file: Reloadable[TokenTable] | None = None
        if auth.tokens_file:
            path = auth.tokens_file
            self.file = Reloadable([path], lambda files: TokenTable.parse(parse_document(files[path], path), path,
                                                                          ADMIN_OPERATIONS),
                                   what="tokens file", interval=auth.reload_interval, on_change=self._changed)
        self.tokens = self._merge()

    def _merge(self) -> TokenTable:
        table = self._env if self.file is None else self._env.merged(self.file.value)
        names = [p.name for p in table.principals]
        if len(set(names)) != len(names):
            raise LoadError("the tokens file and auth.tokens_env give the same name to two tokens")
        return table

    def _changed(self, _: TokenTable) -> None:
        try:
            self.tokens = self._merge()
        except LoadError as exc:
            log.error("tokens not reloaded: %s", exc)
        else:
            log.info("tokens reloaded: %d token(s)", len(self.tokens))

    def start(self) -> None:
        if self.file is not None:
            self.file.start()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()

    def count(self, reason: str) -> None:
        if self._refused is not None:
            self._refused.labels(reason).inc()

    def admit(self, authorization: str | None, peer: Callable[[], str], kind: str, *,
              limit: bool = True) -> Caller | None:
        """Authenticate and (with ``limit``) rate-limit one call of ``kind``; the caller, or None for an
        exempt call. A stream is admitted with ``limit=False`` and each of its messages takes a token."""
        if kind in self.exempt:
            return None
        principal = None
        if self.auth_on:
            token = bearer_token(authorization)
            if token is None:
                self.count("unauthenticated")
                raise Unauthenticated("this server needs a bearer token: send 'authorization: Bearer <token>'"
                                      if not authorization else
                                      "the authorization header must be 'Bearer <token>'")
            principal = self.tokens.lookup(token)
            if principal is None:
                self.count("unauthenticated")
                raise Unauthenticated("unknown bearer token")
        caller = Caller(self, principal, principal.name if principal is not None else peer_host(peer()))
        if limit and kind not in (HEALTH, METRICS):
            caller.take()
        return caller
