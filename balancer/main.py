"""``modelyard balance``: the sidecar / front-proxy load balancer command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any

from modelyard.balancer.config import ConfigError, config_from_dict
from modelyard.balancer.pickers import PICKERS


def register(subparsers: Any) -> None:
    """Add the ``balance`` subcommand."""
    p = subparsers.add_parser(
        "balance",
        help="run the gRPC load balancer in front of model-server replicas",
        description="Service-agnostic gRPC load balancer (raw-bytes proxy). Use --config for pools and routes, "
        "or the convenience flags for one pool.",
    )
    p.add_argument("--config", help="YAML config file (listeners, routes, pools); flags below override it")
    p.add_argument("--listen", help="gRPC listen address host:port (default 127.0.0.1:9001)")
    p.add_argument("--endpoints", help="comma-separated upstream host:port list for a single pool 'default'")
    p.add_argument("--endpoints-file", help="JSON/YAML file of upstream endpoints, watched for changes")
    p.add_argument("--picker", choices=sorted(PICKERS), help="load-balancing policy (default peak_ewma)")
    p.add_argument("--admin-port", type=int, help="admin HTTP port on 127.0.0.1 (0 = any free port)")
    p.add_argument("--admin-address", help="admin HTTP address host:port (default 127.0.0.1:9901)")
    p.add_argument("--no-admin", action="store_true", help="do not start the admin HTTP server")
    p.add_argument("--workers", type=int, help="data-plane processes sharing the port via SO_REUSEPORT")
    p.add_argument("--no-health-check", action="store_true", help="disable active grpc.health.v1 checks")
    p.add_argument("--health-interval", type=float, help="active health-check interval in seconds")
    p.add_argument("--drain-grace", type=float, help="seconds to wait for in-flight requests when draining")
    p.add_argument("--check", action="store_true", help="validate the configuration and exit")
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> Any:
    """Merge --config with the convenience flags into a validated BalancerConfig."""
    import yaml

    data: dict[str, Any] = {}
    if args.config:
        try:
            with open(args.config) as f:
                data = yaml.safe_load(f) or {}
        except OSError as exc:
            raise ConfigError([f"{args.config}: {exc.strerror}"]) from exc
        except yaml.YAMLError as exc:
            raise ConfigError([f"{args.config}: not valid YAML: {exc}"]) from exc
        if not isinstance(data, dict):
            raise ConfigError(["<root>: expected a mapping"])
    if args.listen:
        data["listeners"] = [{"address": args.listen}]
    if args.admin_address:
        data["admin"] = {"address": args.admin_address}
    if args.admin_port is not None:
        data["admin"] = {"address": f"127.0.0.1:{args.admin_port}"}
    if args.no_admin:
        data["admin"] = {"address": None}
    if args.workers is not None:
        data["workers"] = args.workers
    if args.drain_grace is not None:
        data.setdefault("drain", {})["grace"] = args.drain_grace
    pools = data.setdefault("pools", {})
    if args.endpoints or args.endpoints_file or not pools:
        pool = pools.setdefault("default", {})
        eps = pool.setdefault("endpoints", {})
        if args.endpoints:
            eps["static"] = [e.strip() for e in args.endpoints.split(",") if e.strip()]
        if args.endpoints_file:
            eps["file"] = args.endpoints_file
    for pool in pools.values():
        if not isinstance(pool, dict):
            continue
        if args.picker:
            pool["picker"] = args.picker
        if args.no_health_check:
            pool.setdefault("health_check", {})["enabled"] = False
        if args.health_interval is not None:
            pool.setdefault("health_check", {})["interval"] = args.health_interval
    return config_from_dict(data)


async def serve(cfg: Any) -> int:
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
    admin = f", admin http://127.0.0.1:{b.admin_port}" if b.admin_port else ""
    # one parseable line for scripts and tests
    print(f"modelyard balance listening on {','.join(str(p) for p in b.ports)}{admin} "
          f"workers={cfg.workers} pools={','.join(b.pools)}", flush=True)
    await b.wait()
    await b.close()
    return 0


def run(args: argparse.Namespace) -> int:
    """``modelyard balance`` entry point; returns the exit code."""
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = build_config(args)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
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
