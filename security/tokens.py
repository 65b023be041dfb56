"""Bearer tokens: who a caller is, and what it may do.

A tokens document (a YAML or JSON file, or an environment variable) maps each token to the caller
it stands for::

    "3f9c0d...e1":                      # the token itself (at least 16 characters) ...
      name: text-frontend               # who: logs, metrics, the rate limiter's key
      models: ["text_*", identity]      # globs of the models it may use (default: none)
    "sha256:9b74c9897bac770ffc029102a200c5de...":   # ... or "sha256:" + the hex SHA-256 of the token
      name: ops
      models: ["*"]
      admin: [load, unload]             # admin operations it may run (default: none)
      rate_limit: {rps: 50, burst: 100} # its own bucket instead of the component's default

An environment variable may also hold one bare token (a single line): it stands for the caller
``env``, allowed every model and no admin operation.

:meth:`TokenTable.lookup` hashes the presented token (SHA-256) and compares the digest with
:func:`hmac.compare_digest` against **every** entry, without stopping at a match, so the time taken
says nothing about which token (or how much of one) matched. Stored entries are kept as digests only.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from modelyard.security.files import LoadError

#: shortest token accepted: guessing one must stay out of reach
MIN_TOKEN_LENGTH = 16
ALL = "*"
_HASHED = re.compile(r"sha256:([0-9a-fA-F]{64})")
_FIELDS = {"name", "models", "admin", "rate_limit"}
#: model names remembered per caller (allowed or not); beyond it the memo starts over
_MEMO_LIMIT = 1024


@dataclass(eq=False, slots=True)
class Principal:
    """The caller a token stands for."""

    name: str
    #: globs (fnmatch, case-sensitive) of the models it may use
    models: tuple[str, ...] = ()
    #: admin operations it may run ("*": all)
    admin: frozenset[str] = frozenset()
    #: its own rate limit (requests/s, bucket), or None for the component's default
    rps: float | None = None
    burst: int | None = None
    _memo: dict[str, bool] = field(default_factory=dict, repr=False)

    def may_use(self, model: str) -> bool:
        """Whether ``model`` matches one of the globs (memoized: this is on every request's path)."""
        ok = self._memo.get(model)
        if ok is None:
            ok = any(fnmatch.fnmatchcase(model, g) for g in self.models)
            if len(self._memo) >= _MEMO_LIMIT:
                self._memo.clear()
            self._memo[model] = ok
        return ok

    def may(self, operation: str) -> bool:
        return operation in self.admin or ALL in self.admin


def token_digest(token: str | bytes) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape") if isinstance(token, str) else token).digest()


class TokenTable:
    """Token digests and the callers they stand for; :meth:`lookup` is constant-time over the table."""

    def __init__(self, entries: Iterable[tuple[bytes, Principal]] = ()) -> None:
        self._entries = tuple(entries)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def principals(self) -> list[Principal]:
        return [p for _, p in self._entries]

    def lookup(self, token: str | bytes) -> Principal | None:
        """The caller ``token`` stands for, or None; compares against every entry whatever matches."""
        digest = token_digest(token)
        found = None
        for stored, principal in self._entries:
            if hmac.compare_digest(stored, digest):
                found = principal
        return found

    def merged(self, other: TokenTable) -> TokenTable:
        return TokenTable(self._entries + other._entries)

    @classmethod
    def parse(cls, doc: Any, source: str, admin_operations: Iterable[str] = ()) -> TokenTable:
        """Build from a parsed document; :class:`LoadError` listing every problem (tokens never appear in it)."""
        known_ops = set(admin_operations) | {ALL}
        if isinstance(doc, str) and doc.strip() and "\n" not in doc.strip():
            doc = {doc.strip(): {"name": "env", "models": [ALL]}}
        if not isinstance(doc, Mapping) or not doc:
            raise LoadError(f"{source}: expected a mapping of token -> {{name, models, admin}}")
        errors: list[str] = []
        entries: list[tuple[bytes, Principal]] = []
        names: set[str] = set()
        digests: set[bytes] = set()
        for i, (token, spec) in enumerate(doc.items()):
            where = f"entry #{i + 1}"
            if isinstance(spec, Mapping) and isinstance(spec.get("name"), str) and spec["name"]:
                where = f"entry #{i + 1} ({spec['name']})"
            if not isinstance(token, str):
                errors.append(f"{where}: the token must be a string")
                continue
            hashed = _HASHED.fullmatch(token)
            if hashed:
                digest = bytes.fromhex(hashed.group(1))
            elif token.startswith("sha256:"):
                errors.append(f"{where}: 'sha256:' must be followed by 64 hex digits")
                continue
            elif len(token) < MIN_TOKEN_LENGTH or token != token.strip():
                errors.append(f"{where}: a token must have at least {MIN_TOKEN_LENGTH} characters and no "
                              "surrounding spaces")
                continue
            else:
                digest = token_digest(token)
            principal = _principal(spec, where, known_ops, errors)
            if principal is None:
                continue
            if principal.name in names:
                errors.append(f"{where}: name {principal.name!r} is used by another token")
            if digest in digests:
                errors.append(f"{where}: the same token appears twice")
            names.add(principal.name)
            digests.add(digest)
            entries.append((digest, principal))
        if errors:
            raise LoadError(f"{source}: " + "; ".join(errors))
        return cls(entries)


def _principal(spec: Any, where: str, known_ops: set[str], errors: list[str]) -> Principal | None:
    if not isinstance(spec, Mapping):
        errors.append(f"{where}: expected a mapping with name, models, admin")
        return None
    unknown = sorted(set(map(str, spec)) - _FIELDS)
    if unknown:
        errors.append(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(_FIELDS))})")
    name = spec.get("name")
    if not isinstance(name, str) or not name.strip():
        errors.append(f"{where}: name is required (a non-empty string)")
        return None
    models = spec.get("models") or []
    if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
        errors.append(f"{where}: models must be a list of model names or globs")
        models = []
    admin = spec.get("admin") or []
    if not isinstance(admin, list) or not all(isinstance(a, str) for a in admin):
        errors.append(f"{where}: admin must be a list of operations")
        admin = []
    for op in admin:
        if op not in known_ops:
            errors.append(f"{where}: unknown admin operation {op!r} (known: {', '.join(sorted(known_ops))})")
    rps = burst = None
    limit = spec.get("rate_limit")
    if limit is not None:
        if not isinstance(limit, Mapping) or set(map(str, limit)) - {"rps", "burst"}:
            errors.append(f"{where}: rate_limit must be a mapping of rps and burst")
        else:
            rps, burst = limit.get("rps"), limit.get("burst")
            if rps is not None and (isinstance(rps, bool) or not isinstance(rps, int | float) or rps < 0):
                errors.append(f"{where}: rate_limit.rps must be a number >= 0 (0 = no limit)")
                rps = None
            if burst is not None and (isinstance(burst, bool) or not isinstance(burst, int) or burst < 1):
                errors.append(f"{where}: rate_limit.burst must be an integer >= 1")
                burst = None
    return Principal(name.strip(), tuple(models), frozenset(admin), None if rps is None else float(rps), burst)


def parse_document(text: bytes | str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        # the parser's message may quote the document, tokens included: only the position is given
        raise LoadError(f"{source}: not valid YAML or JSON{where}") from None


def load_env(variable: str, admin_operations: Iterable[str] = ()) -> TokenTable:
    """The tokens in environment variable ``variable`` (:class:`LoadError` when unset or invalid)."""
    text = os.environ.get(variable)
    if text is None or not text.strip():
        raise LoadError(f"environment variable {variable} is not set (auth.tokens_env)")
    source = f"${variable}"
    return TokenTable.parse(parse_document(text, source), source, admin_operations)


def bearer_token(header: str | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` value; None when there is none or another scheme."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None
