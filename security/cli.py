"""The security flags ``serve`` and ``balance`` share: TLS, bearer tokens, rate limits.

Each flag defaults to None and only overrides the config file (:func:`modelyard.config.override`).
"""

from __future__ import annotations

import argparse
from functools import partial
from typing import Any

from modelyard.config import default
from modelyard.security.config import RateLimitConfig, TlsConfig


def add_security_flags(p: argparse.ArgumentParser, ports: str) -> Any:
    """Add the group to ``p`` (``ports``: what TLS covers, for the help text); returns the group."""
    tls, rate = partial(default, TlsConfig), partial(default, RateLimitConfig)
    g = p.add_argument_group("security and overload (docs/security.md)")
    g.add_argument("--tls-cert", metavar="PEM", help=f"certificate chain: TLS on {ports} (with --tls-key)")
    g.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    g.add_argument("--tls-client-ca", metavar="PEM",
                   help="CA bundle client certificates must chain to: mTLS, clients without one are refused")
    g.add_argument("--tls-reload-interval", type=float, metavar="S",
                   help="seconds between checks of the certificate files; a change applies to new connections "
                        f"(default {tls('reload_interval')}; 0 = never)")
    g.add_argument("--auth-tokens", metavar="FILE",
                   help="YAML/JSON file of bearer tokens: <token>: {name, models: [globs], admin: [load, unload, "
                        "shared_memory]}; every call then needs 'authorization: Bearer <token>' (reloaded on change)")
    g.add_argument("--auth-tokens-env", metavar="VAR",
                   help="environment variable holding the same document, or one bare token (every model, no admin)")
    g.add_argument("--auth-exempt", metavar="KINDS",
                   help="comma-separated calls that need no token: health, reflection, metrics (default: none)")
    g.add_argument("--rate-limit", type=float, metavar="RPS",
                   help=f"requests/s per client (token name, else peer address) (default {rate('rps')}: no limit)")
    g.add_argument("--rate-burst", type=int, metavar="N",
                   help="requests a client may send at once after being idle (default: max(1, --rate-limit))")
    return g


def security_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys the flags of :func:`add_security_flags` set (None: not given)."""
    return {
        "tls.cert": args.tls_cert,
        "tls.key": args.tls_key,
        "tls.client_ca": args.tls_client_ca,
        "tls.reload_interval": args.tls_reload_interval,
        "auth.tokens_file": args.auth_tokens,
        "auth.tokens_env": args.auth_tokens_env,
        "auth.exempt": ([k.strip() for k in args.auth_exempt.split(",") if k.strip()]
                        if args.auth_exempt is not None else None),
        "rate_limit.rps": args.rate_limit,
        "rate_limit.burst": args.rate_burst,
    }
