"""The security settings, as sections of a component's config (``tls:``, ``auth:``, ``rate_limit:``).

Dataclasses for :func:`modelyard.config.load`: each owns its defaults and validates itself.
Everything is off by default; a section turns on when its first field is given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from modelyard.config import Check

#: callers that can be let in without a token (``auth.exempt``)
HEALTH, REFLECTION, METRICS = "health", "reflection", "metrics"
EXEMPTABLE = (HEALTH, REFLECTION, METRICS)


def _readable(check: Check, key: str, path: str) -> None:
    if path:
        p = Path(path)
        check(p.is_file(), key, f"{path}: no such file")


@dataclass
class TlsConfig:
    """TLS on every listener of the component; mTLS with ``client_ca``."""

    #: PEM certificate chain (the server's certificate first); TLS is on when this is set
    cert: str = ""
    #: PEM private key of that certificate
    key: str = ""
    #: PEM bundle of the CAs client certificates must chain to: mTLS, a client without a valid
    #: certificate is refused during the handshake
    client_ca: str = ""
    #: seconds between checks of the three files for changes (a change is loaded for new
    #: connections; existing ones keep theirs); 0 = load once
    reload_interval: float = 5.0

    @property
    def enabled(self) -> bool:
        return bool(self.cert)

    def validate(self, check: Check) -> None:
        check(bool(self.cert) == bool(self.key), "cert" if not self.cert else "key",
              "cert and key go together: give both or neither")
        check(not self.client_ca or bool(self.cert), "client_ca", "mTLS needs TLS: give cert and key too")
        _readable(check, "cert", self.cert)
        _readable(check, "key", self.key)
        _readable(check, "client_ca", self.client_ca)
        check(self.reload_interval >= 0, "reload_interval", "must be >= 0 (0 = never reload)")


@dataclass
class AuthConfig:
    """Bearer tokens (``authorization: Bearer <token>``); on when a source of tokens is given."""

    #: YAML or JSON file: ``<token>: {name, models: [globs], admin: [operations]}``; watched for changes
    tokens_file: str = ""
    #: name of an environment variable holding the same document (or one bare token: every model, no admin)
    tokens_env: str = ""
    #: what answers without a token: ``health`` (liveness, readiness, health checks), ``reflection``, ``metrics``
    exempt: list[str] = field(default_factory=list)
    #: seconds between checks of ``tokens_file`` for changes (0 = load once)
    reload_interval: float = 5.0

    @property
    def enabled(self) -> bool:
        return bool(self.tokens_file or self.tokens_env)

    def validate(self, check: Check) -> None:
        _readable(check, "tokens_file", self.tokens_file)
        check(self.reload_interval >= 0, "reload_interval", "must be >= 0 (0 = never reload)")
        for i, kind in enumerate(self.exempt):
            check(kind in EXEMPTABLE, f"exempt[{i}]", f"must be one of {', '.join(EXEMPTABLE)}, got {kind!r}")


@dataclass
class RateLimitConfig:
    """A token bucket per client: the token's name when the caller has one, else its address."""

    #: sustained requests per second each client may send; 0 = no limit
    rps: float = 0.0
    #: requests a client may send at once after being idle (bucket size); 0 = max(1, rps)
    burst: int = 0
    #: clients remembered at once; beyond it the least recently seen is forgotten (memory bound)
    max_clients: int = 10000

    @property
    def enabled(self) -> bool:
        return self.rps > 0

    @property
    def bucket(self) -> float:
        return float(self.burst) if self.burst > 0 else max(1.0, self.rps)

    def validate(self, check: Check) -> None:
        check(self.rps >= 0, "rps", "must be >= 0 (0 = no limit)")
        check(self.burst >= 0, "burst", "must be >= 0 (0 = max(1, rps))")
        check(self.max_clients >= 1, "max_clients", "must be >= 1")


@dataclass
class UpstreamTlsConfig:
    """TLS (mTLS with ``cert``/``key``) from a proxy to its upstreams, e.g. the balancer to the replicas of a pool."""

    #: originate TLS to the upstreams (on by itself when ``ca`` or ``cert`` is given)
    enabled: bool = False
    #: PEM bundle of the CAs the upstreams' certificates must chain to ("" = the system's roots)
    ca: str = ""
    #: PEM certificate chain and key presented to the upstreams (mTLS); give both or neither
    cert: str = ""
    key: str = ""
    #: the name the upstreams' certificates are checked against ("" = the host of each endpoint's address)
    server_name: str = ""

    @property
    def on(self) -> bool:
        return self.enabled or bool(self.ca or self.cert)

    def validate(self, check: Check) -> None:
        check(bool(self.cert) == bool(self.key), "cert" if not self.cert else "key",
              "cert and key go together: give both or neither")
        _readable(check, "ca", self.ca)
        _readable(check, "cert", self.cert)
        _readable(check, "key", self.key)
