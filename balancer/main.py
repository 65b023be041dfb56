"""``modelyard balance``: the sidecar / front-proxy load balancer command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any

from modelyard.balancer.config import (
    SOURCE,
    AdminConfig,
    BalancerConfig,
    ConfigError,
    DrainConfig,
    HealthCheckConfig,
    ListenerConfig,
    PoolConfig,
    config_from_dict,
)
from modelyard.balancer.pickers import PICKERS
from modelyard.config import default, override, read_yaml
from modelyard.launcher import print_ready
from modelyard.security.cli import add_security_flags, security_overrides
from modelyard.tracing import configure_logging


def register(subparsers: Any) -> None:
    """Add the ``balance`` subcommand."""
    p = subparsers.add_parser(
        "balance",
        help="run the gRPC load balancer in front of model-server replicas",
        description="Service-agnostic gRPC load balancer (raw-bytes proxy). Use --config for pools and routes, "
        "or the convenience flags for one pool.",
    )
    p.add_argument("--config", help="YAML config file (listeners, routes, pools); flags below override it")
    p.add_argument("--listen", help=f"gRPC listen address host:port (default {default(ListenerConfig, 'address')})")
    p.add_argument("--endpoints", help="comma-separated upstream host:port list for a single pool 'default'")
    p.add_argument("--rest-listen", metavar="HOST:PORT",
                   help="also serve REST (HTTP/1.1) on this address, routed by model to the endpoints' HTTP ports")
    p.add_argument("--http-endpoints", metavar="LIST",
                   help="comma-separated HTTP (REST) host:port of the --endpoints, in the same order")
    p.add_argument("--endpoints-file", help="JSON/YAML file of upstream endpoints, watched for changes")
    p.add_argument("--picker", choices=sorted(PICKERS), help=f"load-balancing policy (default {default(PoolConfig, 'picker')})")
    p.add_argument("--admin-port", type=int, help="admin HTTP port on 127.0.0.1 (0 = any free port)")
    p.add_argument("--admin-address", help=f"admin HTTP address host:port (default {default(AdminConfig, 'address')})")
    p.add_argument("--no-admin", action="store_true", help="do not start the admin HTTP server")
    p.add_argument("--workers", type=int, help=f"data-plane processes sharing the port via SO_REUSEPORT (default {default(BalancerConfig, 'workers')})")
    p.add_argument("--no-health-check", action="store_true", help="disable active grpc.health.v1 checks")
    p.add_argument("--health-interval", type=float, help=f"active health-check interval in seconds (default {default(HealthCheckConfig, 'interval')})")
    p.add_argument("--drain-grace", type=float, help=f"seconds to wait for in-flight requests when draining (default {default(DrainConfig, 'grace')})")
    p.add_argument("--otlp-endpoint", metavar="HOST:PORT",
                   help="trace calls with OpenTelemetry (a span per call, a pick span per attempt; traceparent sent "
                        "with the balancer's span as parent), exporting to this OTLP/gRPC collector")
    add_security_flags(p, "the gRPC and REST listeners")
    p.add_argument("--check", action="store_true", help="validate the configuration and exit")
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> BalancerConfig:
    """Merge --config with the convenience flags (only those given override) into a validated BalancerConfig."""
    data: Any = read_yaml(args.config, SOURCE) if args.config else {}
    if not isinstance(data, dict):
        raise ConfigError(["<root>: expected a mapping"], SOURCE)
    admin = args.admin_address
    if args.admin_port is not None:
        admin = f"127.0.0.1:{args.admin_port}"
    data = override(data, {
        "listeners": [{"address": args.listen}] if args.listen else None,
        "admin": {"address": None} if args.no_admin else {"address": admin} if admin else None,
        "workers": args.workers,
        "drain.grace": args.drain_grace,
        "tracing.enabled": True if args.otlp_endpoint else None,
        "tracing.endpoint": args.otlp_endpoint,
        **security_overrides(args),
    })
    if args.rest_listen:
        data = override(data, {"rest.listeners": [{"address": args.rest_listen}]})
    pools = data.setdefault("pools", {})
    if args.endpoints or args.endpoints_file or not pools:
        static: list[Any] | None = [e.strip() for e in args.endpoints.split(",") if e.strip()] \
            if args.endpoints else None
        if static is not None and args.http_endpoints:
            https = [e.strip() for e in args.http_endpoints.split(",") if e.strip()]
            if len(https) != len(static):
                raise ConfigError([f"--http-endpoints: {len(https)} addresses for {len(static)} --endpoints"], SOURCE)
            static = [{"address": a, "http": h} for a, h in zip(static, https, strict=True)]
        pools["default"] = override(pools.get("default"), {
            "endpoints.static": static,
            "endpoints.file": args.endpoints_file,
        })
    for name, pool in pools.items():
        if isinstance(pool, dict):
            pools[name] = override(pool, {
                "picker": args.picker,
                "health_check.enabled": False if args.no_health_check else None,
                "health_check.interval": args.health_interval,
            })
    return config_from_dict(data)


async def serve(cfg: BalancerConfig) -> int:
    """Run until drained (SIGTERM/SIGINT or admin POST /drain)."""
    from modelyard.balancer.app import Balancer

    b = Balancer(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, b.begin_drain)
    try:
        await b.start()
    except Exception:
        await b.close()
        raise
    hosts = [lst.address.rpartition(":")[0] for lst in cfg.listeners]
    admin = f"{cfg.admin.address.rpartition(':')[0]}:{b.admin_port}" if b.admin_port and cfg.admin.address else None
    # the one structured line every long-running modelyard command prints (modelyard.launcher reads it)
    xds = f"{cfg.xds.address.rpartition(':')[0]}:{b.xds_port}" if b.xds_port and cfg.xds.address else None
    rest_hosts = [rl.address.rpartition(":")[0] for rl in cfg.rest.listeners]
    http = ",".join(f"{h}:{p}" for h, p in zip(rest_hosts, b.rest_ports, strict=False)) or None
    print_ready(grpc=",".join(f"{h}:{p}" for h, p in zip(hosts, b.ports, strict=False)), http=http, admin=admin,
                xds=xds, workers=cfg.workers, pools=",".join(b.pools))
    await b.wait()
    await b.close()
    return 0


def run(args: argparse.Namespace) -> int:
    """``modelyard balance`` entry point; returns the exit code."""
    configure_logging(getattr(logging, str(args.log_level).upper(), logging.INFO))
    try:
        cfg = build_config(args)
    except ConfigError as exc:
        print(exc.report(), file=sys.stderr)
        return 2
    if args.check:
        print("config ok")
        return 0
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        return asyncio.run(serve(cfg))
    except OSError as exc:
        print(f"modelyard balance: {exc}", file=sys.stderr)
        return 1
