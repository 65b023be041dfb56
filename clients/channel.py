"""How a client reaches the server: address, TLS, bearer token, message size limits."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc

from modelyard.clients.proxyless import ProxylessChannel, is_proxyless
from modelyard.protos import grpc_service_pb2_grpc as pb_grpc
from modelyard.security.tls import read_client_files

MiB = 1024 * 1024
DEFAULT_URL = "127.0.0.1:8001"
DEFAULT_MAX_MESSAGE_BYTES = 64 * MiB


def normalize_url(url: str) -> str:
    """``HOST:PORT`` from what people type (``grpc://host:port``, a trailing slash...)."""
    target = url.strip()
    for scheme in ("grpc://", "grpcs://", "http://", "https://"):
        if target.startswith(scheme):
            target = target[len(scheme) :]
            break
    return target.rstrip("/")


@dataclass(frozen=True, slots=True)
class ChannelSettings:
    """Everything both clients need to open a channel and to decorate each call.

    ``credentials`` switches the channel to TLS (``grpc.ssl_channel_credentials(...)``);
    ``token`` is sent as ``authorization: Bearer <token>`` metadata on every call.
    """

    url: str = DEFAULT_URL
    credentials: grpc.ChannelCredentials | None = None
    token: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    options: Sequence[tuple[str, Any]] = ()

    @property
    def target(self) -> str:
        return normalize_url(self.url)

    def channel_options(self) -> list[tuple[str, Any]]:
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            *self.options,
        ]

    def _at(self, address: str) -> ChannelSettings:
        """These settings for one replica's address (proxyless mode)."""
        return ChannelSettings(address, self.credentials, self.token, self.headers, self.max_message_bytes, self.options)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        pairs = [(k.lower(), v) for k, v in self.headers.items()]
        if self.token:
            pairs.append(("authorization", f"Bearer {self.token}"))
        return tuple(pairs)

    def open_sync(self) -> grpc.Channel:
        if is_proxyless(self.url):  # xds://CONTROL_PLANE/POOL: balance here, straight to the replicas
            return ProxylessChannel(self.url, lambda a: self._at(a).open_sync(), aio=False)  # type: ignore[return-value]
        if self.credentials is not None:
            return grpc.secure_channel(self.target, self.credentials, options=self.channel_options())
        return grpc.insecure_channel(self.target, options=self.channel_options())

    def open_aio(self) -> grpc.aio.Channel:
        if is_proxyless(self.url):
            return ProxylessChannel(self.url, lambda a: self._at(a).open_aio(), aio=True)  # type: ignore[return-value]
        if self.credentials is not None:
            return grpc.aio.secure_channel(self.target, self.credentials, options=self.channel_options())
        return grpc.aio.insecure_channel(self.target, options=self.channel_options())


def tls_credentials(ca: str | None = None, cert: str | None = None, key: str | None = None) -> grpc.ChannelCredentials:
    """TLS channel credentials from PEM files: the CA bundle to trust (None: the system's roots) and, for
    mTLS, this client's certificate chain and key (:class:`modelyard.security.files.LoadError` when one
    cannot be read)."""
    files = read_client_files(ca, cert, key)
    return grpc.ssl_channel_credentials(files.ca, files.key, files.cert)


def make_settings(
    url: str,
    *,
    ssl: bool = False,
    credentials: grpc.ChannelCredentials | None = None,
    token: str | None = None,
    headers: Mapping[str, str] | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    channel_options: Sequence[tuple[str, Any]] = (),
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    server_name: str | None = None,
) -> ChannelSettings:
    """Settings from the keyword arguments both clients take. ``ssl=True`` uses the system roots;
    ``ca`` (a PEM bundle to trust instead) and ``cert``/``key`` (a client certificate for mTLS) imply TLS;
    ``server_name`` is the name the server's certificate must carry when it differs from the URL's host."""
    if credentials is None and (ssl or ca or cert or key):
        credentials = tls_credentials(ca, cert, key)
    if server_name:
        channel_options = (*channel_options, ("grpc.ssl_target_name_override", server_name))
    return ChannelSettings(
        url=url,
        credentials=credentials,
        token=token,
        headers=dict(headers or {}),
        max_message_bytes=max_message_bytes,
        options=tuple(channel_options),
    )


class ClientBase:
    """What both clients share: the settings, one channel, the inference and health stubs, the
    metadata sent with every call. Subclasses say which kind of channel with ``_open``."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        ssl: bool = False,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        channel_options: Sequence[tuple[str, Any]] = (),
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        server_name: str | None = None,
    ) -> None:
        self.settings = make_settings(
            url, ssl=ssl, credentials=credentials, token=token, headers=headers,
            max_message_bytes=max_message_bytes, channel_options=channel_options,
            ca=ca, cert=cert, key=key, server_name=server_name,
        )
        self._channel = self._open(self.settings)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._metadata = self.settings.metadata()

    def _open(self, settings: ChannelSettings) -> Any:
        raise NotImplementedError
