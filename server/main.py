"""``modelyard serve``: the server's lifecycle, top to bottom.

serve -> startup (load models, open gRPC + HTTP) -> wait for a signal -> shutdown
(health NOT_SERVING, stop accepting, finish in-flight within the grace period,
unload models). Signal handlers only set an event.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2

from modelyard import tracing
from modelyard.config import ConfigError, default, load, override, read_yaml
from modelyard.launcher import print_ready
from modelyard.protos import grpc_service_pb2 as pb
from modelyard.protos._pool import POOL
from modelyard.security.cli import add_security_flags, security_overrides
from modelyard.security.files import LoadError
from modelyard.security.tls import TlsFiles
from modelyard.server.admission import Admission
from modelyard.server.config import OverloadConfig, ServerConfig
from modelyard.server.frontends.grpc_api import InferenceServicer, add_inference_service
from modelyard.server.frontends.health_api import (
    HEALTH_SERVICE,
    add_grpc_health,
    add_health_route,
    add_health_service,
)
from modelyard.server.frontends.http_protocol_errors import json_protocol_errors
from modelyard.server.frontends.openai_api import add_openai_routes
from modelyard.server.frontends.reflection import enable_reflection
from modelyard.server.frontends.rest_api import build_app
from modelyard.server.guard import Guard
from modelyard.server.health import HealthReport, assess
from modelyard.server.metrics import ServerMetrics
from modelyard.server.model_control import ModelControl
from modelyard.server.repository import ModelRepository
from modelyard.server.shared_memory import SharedMemoryRegistry

log = logging.getLogger("modelyard.server")

SOURCE = "server config"
#: seconds without a new call before the gRPC server is stopped (see ``shutdown``)
SHUTDOWN_QUIET = 0.2
INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


class ModelServer:
    """The gRPC + HTTP model server around one repository."""

    def __init__(self, settings: ServerConfig, grpc_options: Sequence[tuple[str, Any]] = ()) -> None:
        self.settings = settings
        self.grpc_options = list(grpc_options)
        self.metrics = ServerMetrics()
        self.admission = Admission.from_config(settings.overload, self.metrics)
        self.repository = ModelRepository(settings.repository_path, self.metrics, unload_grace=settings.grace,
                                          admission=self.admission)
        #: what loads at start, whether clients may load / unload, repository polling (--model-control-mode)
        self.control = ModelControl(self.repository, settings.model_control_mode,
                                    poll_secs=settings.repository_poll_secs, load_models=settings.models)
        #: tokens and rate limits (None when neither is configured); certificates (None: cleartext)
        self.guard: Guard | None = None
        self.tls: TlsFiles | None = None
        self.health = health.aio.HealthServicer()
        #: system shared memory regions, one registry for gRPC and REST (a region registered over
        #: one protocol is usable from the other, as in Triton)
        self.shm = SharedMemoryRegistry()
        self.started = False
        self.shutting_down = False
        self._stop = asyncio.Event()
        self._health_tasks: set[asyncio.Future[None]] = set()
        self._grpc: grpc.aio.Server | None = None
        self.servicer: InferenceServicer | None = None
        self._http: web.AppRunner | None = None
        self.grpc_port = settings.grpc_port
        self.http_port = settings.http_port

    # ------------------------------------------------------------------ readiness
    def is_ready(self) -> bool:
        return self.started and not self.shutting_down and self.repository.all_ready()

    def health_report(self) -> HealthReport:
        """healthy / degraded / unhealthy with the reasons (GET /health, modelyard.Health/Check)."""
        s = self.settings
        return assess(self.repository, started=self.started, shutting_down=self.shutting_down,
                      queue_depth_limit=s.health_queue_depth, gpu_memory_limit=s.health_gpu_memory)

    def _sync_health(self, model: str | None = None) -> None:
        """Health service "" follows server readiness, "<model>" that model's readiness."""
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        names = [model] if model else list(self.repository.models) + list(self.repository.failed)
        updates = [(name, not self.shutting_down and self.repository.is_ready(name)) for name in names]
        updates.append(("", self.is_ready()))
        for name, ok in updates:
            task = asyncio.ensure_future(self.health.set(name, serving if ok else not_serving))
            self._health_tasks.add(task)
            task.add_done_callback(self._health_tasks.discard)

    # ------------------------------------------------------------------ lifecycle
    async def startup(self) -> None:
        s = self.settings
        self.repository.on_change(self._sync_health)
        failures = await self.control.start()
        if failures:
            for name, reason in failures.items():
                log.error("model %s: %s", name, reason)
            if s.exit_on_error:
                raise SystemExit(f"modelyard: {len(failures)} model(s) failed to load: {', '.join(failures)}")
        options = [
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.so_reuseport", 0),
            *self.grpc_options,
        ]
        await self._load_security()
        guard = self.guard
        server = grpc.aio.server(options=options)
        self.servicer = InferenceServicer(self.repository, self.is_ready, self.shm, guard, s.max_message_bytes,
                                          control=self.control, server_name=s.server_name)
        add_inference_service(self.servicer, server)
        add_grpc_health(self.health, server, guard)
        add_health_service(self.health_report, server, guard)
        enable_reflection(server, (INFERENCE_SERVICE, health.SERVICE_NAME, HEALTH_SERVICE), POOL, guard=guard)
        address = f"{s.host}:{s.grpc_port}"
        bound = (server.add_secure_port(address, self.tls.grpc_credentials()) if self.tls is not None
                 else server.add_insecure_port(address))
        if bound == 0:
            raise SystemExit(f"modelyard: cannot bind gRPC to {s.host}:{s.grpc_port}")
        self.grpc_port = bound
        await server.start()
        self._grpc = server
        app = build_app(self.repository, self.metrics, self.is_ready, s.max_message_bytes, self.shm, guard,
                        control=self.control, server_name=s.server_name)
        add_openai_routes(app)
        add_health_route(app, self.health_report)
        # bodies are decompressed by rest_api.read_body (a worker thread for big ones, 415 for unknown encodings)
        self._http = web.AppRunner(app, access_log=None, auto_decompress=False)
        await self._http.setup()
        json_protocol_errors(self._http)  # unparsable requests get {"error": ...} too, not text/plain
        site = web.TCPSite(self._http, s.host, s.http_port,
                           ssl_context=self.tls.ssl_context() if self.tls is not None else None)
        await site.start()
        if s.http_port == 0:
            self.http_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        for watcher in (self.tls, self.guard):
            if watcher is not None:
                watcher.start()
        self.started = True
        self._sync_health()
        log.info("modelyard serving %d model(s) from %s: gRPC %s:%d, HTTP %s:%d%s",
                 len(self.repository.models), s.repository_path, s.host, self.grpc_port, s.host, self.http_port,
                 " (TLS, client certificates required)" if s.tls.client_ca else " (TLS)" if s.tls.enabled else "")

    async def _load_security(self) -> None:
        """Certificates and tokens, read and checked in a worker thread; a problem stops the start (exit 1)."""
        s = self.settings
        try:
            if s.tls.enabled:
                self.tls = await asyncio.to_thread(TlsFiles, s.tls, ("http/1.1",))
            if s.auth.enabled or s.rate_limit.enabled:
                self.guard = await asyncio.to_thread(Guard, s.auth, s.rate_limit, self.metrics)
        except LoadError as exc:
            raise SystemExit(f"modelyard: {exc}") from None

    def request_stop(self) -> None:
        """Signal-safe: only sets a flag."""
        self._stop.set()

    async def shutdown(self) -> None:
        """Health NOT_SERVING, stop accepting, finish in-flight within the grace period, unload."""
        self.shutting_down = True
        await self.health.enter_graceful_shutdown()
        if self.settings.drain_delay > 0:
            log.info("health NOT_SERVING; still accepting for %.1fs (drain delay)", self.settings.drain_delay)
            await asyncio.sleep(self.settings.drain_delay)
        grace = self.settings.grace
        if self._grpc is not None:
            # grpc's stop() cancels the calls it has received but not yet handed to us (CANCELLED, which no
            # client can tell from a processed call); so first answer new calls UNAVAILABLE -- never
            # processed, a balancer retries them elsewhere -- and wait for in-flight ones and for quiet
            t0 = time.monotonic()
            await self._refuse_new_calls(min(grace, 5.0))
            await self._grpc.stop(max(0.0, grace - (time.monotonic() - t0)))
        if self._http is not None:
            await self._http.cleanup()
        for watcher in (self.tls, self.guard):
            if watcher is not None:
                await asyncio.to_thread(watcher.close)
        await self.control.close()  # no poll may load a model while the repository closes
        await self.repository.close()
        await asyncio.to_thread(self.shm.close)  # CUDA regions: cudaIpcCloseMemHandle blocks
        log.info("modelyard stopped")

    async def _refuse_new_calls(self, limit: float) -> None:
        """Refuse new calls until none is in flight and none arrived for ``SHUTDOWN_QUIET`` s (at most ``limit`` s)."""
        servicer = self.servicer
        if servicer is None:
            return
        servicer.refusing = True
        servicer.last_arrival = time.monotonic()
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if servicer.active == 0 and time.monotonic() - servicer.last_arrival >= SHUTDOWN_QUIET:
                return
            await asyncio.sleep(0.02)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        tracing.setup(self.settings.tracing, "modelyard-serve")  # imports OpenTelemetry only when enabled
        await self.startup()
        host = self.settings.host
        print_ready(grpc=f"{host}:{self.grpc_port}", http=f"{host}:{self.http_port}")
        await self._stop.wait()
        await self.shutdown()
        await asyncio.to_thread(tracing.shutdown)  # the last spans are exported


def run_server(settings: ServerConfig) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code."""
    uvloop: Any = None
    if settings.loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if settings.loop == "uvloop":
                raise
    server = ModelServer(settings)
    try:
        if uvloop is not None:
            uvloop.run(server.serve())
        else:
            asyncio.run(server.serve())
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            return 1
        raise
    return 0


def build_config(args: argparse.Namespace) -> ServerConfig:
    """``--config`` file (if any) with the flags that were given on top; validated."""
    data: Any = read_yaml(args.config, SOURCE) if args.config else {}
    if not isinstance(data, dict):
        raise ConfigError(["<root>: expected a mapping"], SOURCE)
    data = override(data, {
        "model_repository": args.model_repository,
        "host": args.host,
        "grpc_port": args.grpc_port,
        "http_port": args.http_port,
        "models": args.model,
        "model_control_mode": args.model_control_mode,
        "server_name": args.server_name,
        "repository_poll_secs": args.repository_poll_secs,
        "max_message_mb": args.max_message_mb,
        "grace": args.grace,
        "drain_delay": args.drain_delay,
        "exit_on_error": False if args.no_exit_on_error else None,
        "loop": args.loop,
        "health_queue_depth": args.health_queue_depth,
        "health_gpu_memory": args.health_gpu_memory,
        "tracing.enabled": True if args.otlp_endpoint else None,
        "tracing.endpoint": args.otlp_endpoint,
        **security_overrides(args),
        "overload.max_inflight": args.max_inflight,
        "overload.max_queue_ms": args.max_queue_ms,
    })
    return load(ServerConfig, data, source=SOURCE)


def _cmd_serve(args: argparse.Namespace) -> int:
    tracing.configure_logging(getattr(logging, args.log_level.upper()))  # the request id in every line
    try:
        settings = build_config(args)
    except ConfigError as exc:
        print(exc.report(), file=sys.stderr)
        return 2
    return run_server(settings)


def register(sub: Any) -> None:
    """Add the ``serve`` subcommand."""
    d = partial(default, ServerConfig)
    p = sub.add_parser("serve", help="run the model server (gRPC + HTTP)",
                       description="Serve models over the KServe v2 / Triton gRPC protocol and REST.")
    p.add_argument("--config", metavar="FILE", help="YAML file of these settings (model_repository, grpc_port, ...); "
                   "flags given on the command line override it")
    p.add_argument("--model-repository", "-r", metavar="DIR",
                   help="model repository directory (<model>/config.yaml, <model>/<version>/); default: built-in demo models")
    p.add_argument("--host", help=f"address to bind gRPC and HTTP to (default {d('host')})")
    p.add_argument("--grpc-port", type=int, help=f"gRPC port (default {d('grpc_port')}; 0 = any free port)")
    p.add_argument("--http-port", type=int, help=f"HTTP/REST port (default {d('http_port')}; 0 = any free port)")
    p.add_argument("--load-model", "--model", dest="model", action="append", metavar="NAME",
                   help="load this model at start (repeatable; '*' alone = every model); for model control mode "
                        "explicit (default: none) and unset (default: every model in the repository)")
    p.add_argument("--server-name", metavar="NAME",
                   help=f"the name ServerMetadata and GET /v2 report (default {d('server_name')}; scripts written "
                        "for Triton that check the name want 'triton')")
    p.add_argument("--model-control-mode", choices=["none", "poll", "explicit"],
                   help="as Triton: none = load every model at start and refuse load/unload requests; poll = the "
                        "same, and rescan the repository every --repository-poll-secs (load new or changed models, "
                        "unload removed ones); explicit = load only --load-model models at start, clients load and "
                        "unload. Unset: load --load-model models (default every one) and allow load/unload")
    p.add_argument("--repository-poll-secs", type=float, metavar="S",
                   help=f"poll mode: seconds between repository scans (default {d('repository_poll_secs')})")
    p.add_argument("--max-message-mb", type=int,
                   help=f"max gRPC/HTTP message size in MiB, both ways (default {d('max_message_mb')})")
    p.add_argument("--grace", type=float,
                   help=f"seconds in-flight requests get to finish on SIGTERM or unload (default {d('grace')})")
    p.add_argument("--drain-delay", type=float,
                   help="on SIGTERM, seconds to keep accepting requests after health turns NOT_SERVING "
                        f"(default {d('drain_delay')})")
    p.add_argument("--no-exit-on-error", action="store_true",
                   help="keep serving the other models when one fails to load at start")
    p.add_argument("--loop", choices=["auto", "asyncio", "uvloop"],
                   help=f"event loop implementation (default {d('loop')}: uvloop when installed)")
    p.add_argument("--health-queue-depth", type=int,
                   help="GET /health reports degraded when a model's queue holds more requests than this "
                        f"(default {d('health_queue_depth')}; 0 = no limit)")
    p.add_argument("--health-gpu-memory", type=float,
                   help="GET /health reports degraded when a GPU's used memory fraction is above this "
                        f"(default {d('health_gpu_memory')})")
    over = partial(default, OverloadConfig)
    g = add_security_flags(p, "the gRPC and HTTP ports")
    g.add_argument("--max-inflight", type=int, metavar="N",
                   help="inference requests in flight in the whole server beyond which new ones get "
                        f"RESOURCE_EXHAUSTED at once (default {over('max_inflight')}; 0 = no limit)")
    g.add_argument("--max-queue-ms", type=float, metavar="MS",
                   help="a request waiting longer than this for a model instance gets RESOURCE_EXHAUSTED instead of "
                        f"being computed (default {over('max_queue_ms')}: no bound)")
    p.add_argument("--otlp-endpoint", metavar="HOST:PORT",
                   help="trace requests with OpenTelemetry, exporting spans to this OTLP/gRPC collector "
                        "(needs modelyard[tracing]; default: tracing off)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="log level")
    p.set_defaults(func=_cmd_serve)
