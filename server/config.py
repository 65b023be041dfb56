"""``modelyard serve``'s own settings: one config class that owns its defaults and validates itself.

Given as flags or as a YAML file (``modelyard serve --config server.yaml``); a flag that is
given overrides the file, a flag that is not leaves the file's value or the default below.
Each model's ``config.yaml`` is :mod:`modelyard.server.model_config`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from modelyard.config import Check
from modelyard.security.config import AuthConfig, RateLimitConfig, TlsConfig
from modelyard.server.demo_models import DEMO_REPOSITORY
from modelyard.tracing import TracingConfig

MiB = 1024 * 1024


@dataclass
class OverloadConfig:
    """Server-wide load shedding (per-model bounds are ``max_concurrency`` and ``max_queue_size`` in config.yaml)."""

    #: inference requests in flight in the whole server (gRPC, streams, REST, OpenAI) beyond which a new
    #: one is answered RESOURCE_EXHAUSTED at once, before it is queued (0 = no limit)
    max_inflight: int = 1024
    #: a request still waiting for a model instance after this many ms is answered RESOURCE_EXHAUSTED
    #: instead of computed, so latency stays bounded under overload (0 = no bound)
    max_queue_ms: float = 0.0
    #: the retry-after hint sent with those answers (ms)
    retry_after_ms: int = 100

    def validate(self, check: Check) -> None:
        check(self.max_inflight >= 0, "max_inflight", "must be >= 0 (0 = no limit)")
        check(self.max_queue_ms >= 0, "max_queue_ms", "must be >= 0 (0 = no bound)")
        check(self.retry_after_ms >= 0, "retry_after_ms", "must be >= 0")


@dataclass
class ServerConfig:
    """Everything ``modelyard serve`` can be told."""

    #: model repository directory (``<model>/config.yaml``, ``<model>/<version>/``); empty = built-in demo models
    model_repository: str = ""
    #: address gRPC and HTTP bind to
    host: str = "127.0.0.1"
    #: gRPC port (0 = any free port)
    grpc_port: int = 8001
    #: HTTP/REST port (0 = any free port)
    http_port: int = 8000
    #: models to load at start (None = every model in the repository; ``["*"]`` = every model too);
    #: Triton's ``--load-model``, for modes explicit and unset
    models: list[str] | None = field(default=None, metadata={"aliases": ("load_model",)})
    #: Triton's model control mode: none (load every model at start, refuse load / unload), poll (as none,
    #: and rescan the repository every repository_poll_secs), explicit (load the ``models`` at start, allow
    #: load / unload); unset (null): load ``models`` (default all) and allow load / unload -- modelyard's
    #: behaviour before model control modes, kept as the default
    model_control_mode: str | None = None
    #: poll mode: seconds between two scans of the repository (Triton's default, 15)
    repository_poll_secs: float = 15.0
    #: max gRPC/HTTP message size in MiB, both ways
    max_message_mb: int = 64
    #: seconds in-flight requests get to finish on SIGTERM or unload
    grace: float = 30.0
    #: on SIGTERM, seconds to keep serving after health turns NOT_SERVING, so that load
    #: balancers notice before connections close (Kubernetes preStop style)
    drain_delay: float = 0.0
    #: exit when a model fails to load at start (false: keep serving the others)
    exit_on_error: bool = True
    #: event loop implementation: auto (uvloop when installed), asyncio or uvloop
    loop: str = "auto"
    #: GET /health (and modelyard.Health/Check) reports degraded when a model's queue holds more
    #: requests than this (0 = no limit)
    health_queue_depth: int = 100
    #: ... or when a GPU in use has more than this fraction of its memory used
    health_gpu_memory: float = 0.9
    #: TLS / mTLS on both ports (docs/security.md)
    tls: TlsConfig = field(default_factory=TlsConfig)
    #: bearer tokens and what each may do (docs/security.md)
    auth: AuthConfig = field(default_factory=AuthConfig)
    #: per-client token buckets (client = the token's name, else the peer address)
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)
    #: load shedding: answer RESOURCE_EXHAUSTED at once instead of queueing without bound
    overload: OverloadConfig = field(default_factory=lambda: OverloadConfig())
    #: OpenTelemetry spans (request, queue, batch, compute) over OTLP; off by default (docs/operations.md)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    #: the name ServerMetadata (gRPC) and GET /v2 report; scripts written for Triton that check it
    #: for "triton" work with ``server_name: triton``
    server_name: str = "modelyard"

    @property
    def repository_path(self) -> Path:
        return Path(self.model_repository) if self.model_repository else DEMO_REPOSITORY

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * MiB

    def validate(self, check: Check) -> None:
        for key in ("grpc_port", "http_port"):
            port = getattr(self, key)
            check(0 <= port < 65536, key, f"must be a port number (0 = any free port), got {port}")
        check(self.max_message_mb >= 1, "max_message_mb", "must be >= 1")
        check(self.grace >= 0, "grace", "must be >= 0")
        check(self.drain_delay >= 0, "drain_delay", "must be >= 0")
        check(self.health_queue_depth >= 0, "health_queue_depth", "must be >= 0")
        check(0 < self.health_gpu_memory <= 1, "health_gpu_memory", "must be a fraction in (0, 1]")
        check(self.loop in ("auto", "asyncio", "uvloop"), "loop", f"must be auto, asyncio or uvloop, got {self.loop!r}")
        if self.model_repository:
            check(not (problem := repository_problem(Path(self.model_repository))), "model_repository",
                  f"{self.model_repository} {problem}")
        mode = self.model_control_mode
        check(mode in (None, "none", "poll", "explicit"), "model_control_mode",
              f"must be none, poll or explicit, got {mode!r}")
        check(self.repository_poll_secs >= 0, "repository_poll_secs", "must be >= 0")
        if mode == "poll":
            check(self.repository_poll_secs > 0, "repository_poll_secs", "must be > 0 in model_control_mode poll")
        if self.models is not None:
            check("*" not in self.models or self.models == ["*"], "models",
                  "Wildcard model name '*' must be the ONLY startup model if specified at all.")
            check(mode not in ("none", "poll"), "models",
                  f"load_model is for model_control_mode explicit; mode {mode} loads every model")


def repository_problem(path: Path) -> str:
    """Why ``path`` cannot be a model repository ("" when it can)."""
    if not path.is_dir():
        return "is not a directory" if path.exists() else "does not exist"
    if not os.access(path, os.R_OK | os.X_OK):
        return "is not readable"
    try:
        next(os.scandir(path), None)
    except OSError as exc:
        return f"is not readable ({exc.strerror})"
    return ""
