"""Settings of the REST (HTTP/1.1) listener; loaded as ``rest:`` of the balancer config (``BalancerConfig.rest``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from modelyard.config import Check

#: POST paths safe to send twice (an inference is a pure function of its request, as ModelInfer on gRPC);
#: GET, HEAD, OPTIONS, PUT and DELETE are idempotent whatever the path (RFC 9110 9.2.2)
DEFAULT_IDEMPOTENT_PATHS = ["/v2/models/*/infer", "/v2/models/*/versions/*/infer", "/v1/embeddings"]
#: POST paths whose JSON body names the model (``"model": "..."``): the OpenAI-style endpoints
DEFAULT_MODEL_BODY_PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]


def _host_port_ok(address: str) -> bool:
    host, sep, port = address.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 <= int(port) < 65536)


@dataclass
class RestListenerConfig:
    """An HTTP/1.1 listening address."""

    address: str = "127.0.0.1:9000"

    @classmethod
    def normalize(cls, raw: Any) -> Any:
        return {"address": raw} if isinstance(raw, str) else raw

    def validate(self, check: Check) -> None:
        check(_host_port_ok(self.address), "address", f"expected host:port, got {self.address!r}")


@dataclass
class RestConfig:
    """The REST listener: KServe v2 / OpenAI-style HTTP/1.1 routed by model to the endpoints' ``http`` addresses."""

    #: HTTP/1.1 listening addresses (none: no REST listener)
    listeners: list[RestListenerConfig] = field(default_factory=list)
    #: request line + headers, bytes (over it: 431)
    max_header_bytes: int = 64 * 1024
    #: header fields per request (over it: 431)
    max_headers: int = 100
    #: request body, bytes; bodies are read whole before they are sent (over it: 413)
    max_body_bytes: int = 64 * 1024 * 1024
    #: seconds a client has to send a whole request head (slow clients: 408)
    header_timeout: float = 10.0
    #: seconds an idle keep-alive client connection (or one sending no more body bytes) is kept
    idle_timeout: float = 60.0
    #: seconds an idle connection to an endpoint is kept for reuse (below the server's own keep-alive)
    upstream_idle_timeout: float = 15.0
    #: idle keep-alive connections kept per endpoint
    upstream_max_idle: int = 64
    #: POST paths (fnmatch globs) safe to send twice: retried after a failure once sent
    idempotent_paths: list[str] = field(default_factory=lambda: list(DEFAULT_IDEMPOTENT_PATHS))
    #: POST paths whose JSON body's ``model`` field routes the request
    model_body_paths: list[str] = field(default_factory=lambda: list(DEFAULT_MODEL_BODY_PATHS))

    def validate(self, check: Check) -> None:
        check(self.max_header_bytes >= 1024, "max_header_bytes", "must be >= 1024")
        check(self.max_headers >= 1, "max_headers", "must be >= 1")
        check(self.max_body_bytes >= 0, "max_body_bytes", "must be >= 0")
        for key in ("header_timeout", "idle_timeout", "upstream_idle_timeout"):
            check(getattr(self, key) > 0, key, "must be > 0")
        check(self.upstream_max_idle >= 0, "upstream_max_idle", "must be >= 0")
        for key in ("idempotent_paths", "model_body_paths"):
            for p in getattr(self, key):
                check(p.startswith("/"), key, f"expected a path starting with /, got {p!r}")
