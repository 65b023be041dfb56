"""Admission of one call: who is calling (bearer token), may they use this model or admin operation,
and is their client over its rate limit. Protocol-independent; ``serve`` and ``balance`` both use it.

- every call needs a known bearer token (UNAUTHENTICATED, HTTP 401, otherwise), except the kinds
  listed in ``auth.exempt``: ``health``, ``reflection``, ``metrics``;
- a call that names a model needs the model in the token's ``models`` globs, and an admin
  operation (``load``, ``unload``, ``shared_memory``) in its ``admin`` list (PERMISSION_DENIED, 403);
- every call but health checks and metrics takes a token from its client's bucket (RESOURCE_EXHAUSTED,
  429, with a retry-after hint, when empty); the client is the token's name, else the peer's address.

The errors raised are the class attributes :attr:`Guard.Unauthenticated`, :attr:`Guard.PermissionDenied`
and :attr:`Guard.RateLimited`: a component subclasses :class:`Guard` to raise its own error types
(the server's carry gRPC status codes and HTTP statuses of its error hierarchy). The defaults here
(:class:`Refused` and its subclasses) carry the numeric gRPC code and HTTP status for a component
that writes statuses itself (the balancer's relay).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from modelyard.security.config import HEALTH, METRICS, AuthConfig, RateLimitConfig
from modelyard.security.files import LoadError, Reloadable
from modelyard.security.ratelimit import TokenBuckets
from modelyard.security.tokens import Principal, TokenTable, bearer_token, load_env, parse_document

__all__ = ["ADMIN_OPERATIONS", "Caller", "Guard", "PermissionDenied", "RateLimited", "Refused", "Unauthenticated",
           "peer_address", "peer_host"]

log = logging.getLogger("modelyard.security")

#: the admin operations a token may be given: repository load and unload, system shared memory
#: (register, unregister, status)
ADMIN_OPERATIONS = ("load", "unload", "shared_memory")


class Refused(Exception):
    """A call refused before it reached a model; ``grpc_code``/``http`` say how to answer it."""

    grpc_code = 7
    http = 403
    retry_after_ms: int | None = None

    def __init__(self, message: str, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if retry_after_ms is not None:
            self.retry_after_ms = retry_after_ms


class Unauthenticated(Refused):
    grpc_code = 16
    http = 401


class PermissionDenied(Refused):
    grpc_code = 7
    http = 403


class RateLimited(Refused):
    grpc_code = 8
    http = 429


@dataclass(slots=True)
class Caller:
    """Who is making the current call (None principal: authentication is off) and their client key."""

    guard: Guard
    principal: Principal | None
    client: str

    @property
    def restricted(self) -> bool:
        """Whether some model is off limits to this caller (its models are not just ``*``)."""
        p = self.principal
        return p is not None and p.models != ("*",)

    def check_model(self, model: str) -> None:
        p = self.principal
        if p is not None and not p.may_use(model):
            self.guard.count("permission_denied")
            raise self.guard.PermissionDenied(f"token '{p.name}' may not use model '{model}'")

    def check_admin(self, operation: str) -> None:
        p = self.principal
        if p is not None and not p.may(operation):
            self.guard.count("permission_denied")
            allowed = ", ".join(sorted(p.admin)) or "none"
            raise self.guard.PermissionDenied(f"token '{p.name}' may not run admin operation '{operation}' "
                                              f"(its admin operations: {allowed})")

    def can_see(self, model: str) -> bool:
        return self.principal is None or self.principal.may_use(model)

    def take(self) -> None:
        """One request from this client's bucket, or RateLimited with the time until its next token."""
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
            raise self.guard.RateLimited(f"client '{self.client}' is over its rate limit ({rps:g} requests/s); "
                                         f"retry after {ms} ms", ms)


def peer_address(peername: object) -> str:
    """A socket's ``peername`` as ``host:port`` (``[v6]:port``), the form :func:`peer_host` reads."""
    if isinstance(peername, tuple) and len(peername) >= 2:
        host = str(peername[0])
        return f"[{host}]:{peername[1]}" if ":" in host else f"{host}:{peername[1]}"
    return str(peername or "")


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
    """Tokens, exemptions and rate limiter of one component. Reads the tokens file: build it in a
    worker thread or at startup, then :meth:`start` the file watcher."""

    Unauthenticated: ClassVar[type[Exception]] = Unauthenticated
    PermissionDenied: ClassVar[type[Exception]] = PermissionDenied
    RateLimited: ClassVar[type[Exception]] = RateLimited

    def __init__(self, auth: AuthConfig, limits: RateLimitConfig, refused: Any = None) -> None:
        """``refused``: a counter with one label (the reason), as prometheus_client's ``Counter``."""
        self.auth_on = auth.enabled
        self.exempt = frozenset(auth.exempt)
        # with tokens, a token's own rate_limit applies even when there is no default limit (rps 0)
        self.buckets = (TokenBuckets(limits.rps, limits.bucket, limits.max_clients)
                        if limits.enabled or auth.enabled else None)
        self._refused = refused
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
                raise self.Unauthenticated("this server needs a bearer token: send 'authorization: Bearer <token>'"
                                           if not authorization else
                                           "the authorization header must be 'Bearer <token>'")
            principal = self.tokens.lookup(token)
            if principal is None:
                self.count("unauthenticated")
                raise self.Unauthenticated("unknown bearer token")
        caller = Caller(self, principal, principal.name if principal is not None else peer_host(peer()))
        if limit and kind not in (HEALTH, METRICS):
            caller.take()
        return caller
