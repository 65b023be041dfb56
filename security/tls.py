"""Certificates for TLS and mTLS listeners, reloaded when their files change.

:class:`TlsFiles` loads a certificate chain, its key and optionally the client CA bundle (mTLS),
checks that they make a working server context (the key matches the certificate, the CA bundle
parses) and keeps watching them (:class:`~modelyard.security.files.Reloadable`). Two views of the
same files:

- :meth:`TlsFiles.grpc_credentials`: ``grpc.dynamic_ssl_server_credentials`` whose fetcher hands
  gRPC the new certificate after a reload; gRPC uses it for new handshakes, established
  connections are untouched. gRPC negotiates ALPN ``h2`` itself.
- :meth:`TlsFiles.ssl_context`: an :class:`ssl.SSLContext` for asyncio/aiohttp listeners. Every
  (re)load builds a complete context in the watcher thread; the listener's context switches each
  new handshake to the newest one from its server-name callback (OpenSSL calls it for every
  ClientHello, with or without SNI). Connections already established keep the context they
  were handshaken with.

Client side: :func:`client_ssl_context` and :func:`read_client_files` (CA to trust, optional client
certificate and key).
"""

from __future__ import annotations

import hashlib
import logging
import ssl
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from modelyard.security.config import TlsConfig, UpstreamTlsConfig
from modelyard.security.files import LoadError, Reloadable

log = logging.getLogger("modelyard.security")

#: oldest TLS version a listener accepts
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


@dataclass(frozen=True, slots=True)
class CertBundle:
    """One loaded version of the files, and the server context built from them."""

    chain: bytes
    key: bytes
    client_ca: bytes | None
    #: SHA-256 of the leaf certificate (DER), hex: what logs and tests compare
    fingerprint: str
    context: ssl.SSLContext

    @property
    def mtls(self) -> bool:
        return self.client_ca is not None


def _leaf_fingerprint(chain: bytes, path: str) -> str:
    text = chain.decode("ascii", "replace")
    start = text.find("-----BEGIN CERTIFICATE-----")
    end = text.find("-----END CERTIFICATE-----", start)
    if start < 0 or end < 0:
        raise LoadError(f"{path}: no PEM certificate in it")
    der = ssl.PEM_cert_to_DER_cert(text[start:end + len("-----END CERTIFICATE-----")])
    return hashlib.sha256(der).hexdigest()


def server_context(cert_path: str, key_path: str, client_ca: bytes | None, ca_path: str,
                   alpn: Sequence[str]) -> ssl.SSLContext:
    """A TLS server context from files (:class:`LoadError` naming what is wrong)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MINIMUM_VERSION
    try:
        ctx.load_cert_chain(cert_path, key_path)
    except (ssl.SSLError, OSError) as exc:
        raise LoadError(f"{cert_path} / {key_path}: not a certificate chain and its private key "
                        f"({getattr(exc, 'reason', None) or exc})") from None
    if client_ca is not None:
        try:
            ctx.load_verify_locations(cadata=client_ca.decode("ascii"))
        except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
            raise LoadError(f"{ca_path}: not a PEM CA bundle ({getattr(exc, 'reason', None) or exc})") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


class TlsFiles:
    """The server's certificate, key and client CA, loaded and watched (see the module doc).

    ``alpn`` is what :meth:`ssl_context` offers (``["http/1.1"]`` for a REST listener, ``["h2"]``
    for an HTTP/2 one); gRPC's credentials negotiate ``h2`` on their own. Create it in a worker
    thread or at startup (it reads files), then :meth:`start` the watcher.
    """

    def __init__(self, config: TlsConfig, alpn: Sequence[str] = ("http/1.1",)) -> None:
        if not config.enabled:
            raise ValueError("TLS is not configured (no cert)")
        self.config = config
        self.alpn = tuple(alpn)
        paths = [config.cert, config.key] + ([config.client_ca] if config.client_ca else [])
        self._lock = threading.Lock()
        self.files: Reloadable[CertBundle] = Reloadable(paths, self._build, what="TLS certificate",
                                                        interval=config.reload_interval, on_change=self._changed)

    def _build(self, files: Mapping[str, bytes]) -> CertBundle:
        c = self.config
        chain, key = files[c.cert], files[c.key]
        ca = files[c.client_ca] if c.client_ca else None
        fingerprint = _leaf_fingerprint(chain, c.cert)
        ctx = server_context(c.cert, c.key, ca, c.client_ca, self.alpn)
        ctx.sni_callback = self._pick_context
        return CertBundle(chain, key, ca, fingerprint, ctx)

    def _changed(self, bundle: CertBundle) -> None:
        log.info("TLS certificate now %s (new connections)", bundle.fingerprint[:16])

    @property
    def current(self) -> CertBundle:
        return self.files.value

    def start(self) -> None:
        self.files.start()

    def close(self) -> None:
        self.files.close()

    # ------------------------------------------------------------------ asyncio / aiohttp
    def ssl_context(self) -> ssl.SSLContext:
        """The listener's context: each new handshake switches to the newest loaded context."""
        return self.current.context

    def _pick_context(self, sslobj: Any, server_name: str | None, ctx: ssl.SSLContext) -> None:
        newest = self.files.value.context
        if newest is not ctx:
            sslobj.context = newest

    # ------------------------------------------------------------------ gRPC
    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Dynamic gRPC server credentials: a reload reaches new handshakes, established connections stay."""
        first = self.current
        handed = [self.files.generation]

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            # called by gRPC for every handshake: answers None ("unchanged") unless a reload happened
            generation = self.files.generation
            if generation == handed[0]:
                return None
            with self._lock:
                handed[0] = generation
                return _grpc_configuration(self.files.value)

        return grpc.dynamic_ssl_server_credentials(_grpc_configuration(first), fetch,
                                                   require_client_authentication=first.mtls)


def _grpc_configuration(bundle: CertBundle) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(bundle.key, bundle.chain)], root_certificates=bundle.client_ca)


# ---------------------------------------------------------------------- clients


@dataclass(frozen=True, slots=True)
class ClientFiles:
    """What a TLS client presents and trusts (PEM bytes; None: the system's roots / no client certificate)."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None


def read_client_files(ca: str | None = None, cert: str | None = None, key: str | None = None) -> ClientFiles:
    """Read a client's CA bundle and certificate/key files (:class:`LoadError` naming a missing one)."""
    if bool(cert) != bool(key):
        raise LoadError("a client certificate and its key go together: give both or neither")

    def read(path: str | None) -> bytes | None:
        if not path:
            return None
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise LoadError(f"{path}: {exc.strerror or exc}") from None

    return ClientFiles(read(ca), read(cert), read(key))


def client_ssl_context(ca: str | None = None, cert: str | None = None, key: str | None = None,
                       alpn: Sequence[str] = ()) -> ssl.SSLContext:
    """A verifying client context from files: the CA bundle to trust (else the system's roots), the
    client certificate and key for mTLS if given."""
    if bool(cert) != bool(key):
        raise LoadError("a client certificate and its key go together: give both or neither")
    try:
        ctx = ssl.create_default_context(cafile=ca or None)
        if cert and key:
            ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise LoadError(f"client TLS files ({ca or 'system roots'}, {cert or 'no certificate'}): "
                        f"{getattr(exc, 'reason', None) or exc}") from None
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def upstream_ssl_context(cfg: UpstreamTlsConfig, alpn: Sequence[str]) -> ssl.SSLContext | None:
    """The client context a proxy uses towards its upstreams (None when ``cfg`` is off)."""
    if not cfg.on:
        return None
    return client_ssl_context(cfg.ca or None, cfg.cert or None, cfg.key or None, alpn)


def upstream_grpc_credentials(cfg: UpstreamTlsConfig) -> grpc.ChannelCredentials | None:
    """The same files as gRPC channel credentials (the balancer's health checks), None when off."""
    if not cfg.on:
        return None
    files = read_client_files(cfg.ca or None, cfg.cert or None, cfg.key or None)
    return grpc.ssl_channel_credentials(files.ca, files.key, files.cert)
