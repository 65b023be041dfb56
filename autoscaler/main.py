"""``modelyard autoscale``: the autoscaler daemon from a config file, until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any

from modelyard.autoscaler.config import SOURCE, AutoscaleConfig
from modelyard.config import ConfigError, load_file
from modelyard.launcher import print_ready


def register(subparsers: Any) -> None:
    """Add the ``autoscale`` subcommand."""
    p = subparsers.add_parser(
        "autoscale", help="run the autoscaler daemon (pools scaled locally or on Kubernetes)",
        description="Reads each pool's load (balancer and replica metrics), decides the replica count "
        "(Knative KPA / HPA style, or an SLO on p99) and applies it with the pool's actuator. "
        "On SIGTERM it stops and leaves the replicas as they are.")
    p.add_argument("--config", required=True, metavar="FILE", help="YAML file: tick, admin, pools (policy, source, actuator)")
    p.add_argument("--check", action="store_true", help="validate the configuration and exit")
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    p.set_defaults(func=run)


async def serve(cfg: AutoscaleConfig) -> int:
    """Run until SIGTERM/SIGINT."""
    from modelyard.autoscaler.daemon import Autoscaler

    daemon = Autoscaler(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.stop)
    try:
        await daemon.start()
        admin = None
        if cfg.admin is not None and daemon.admin_port is not None:
            admin = f"{cfg.admin.rpartition(':')[0]}:{daemon.admin_port}"
        print_ready(admin=admin, pools=",".join(cfg.pools))
        await daemon.wait()
    finally:
        await daemon.close(stop_replicas=False)
    return 0


def run(args: argparse.Namespace) -> int:
    """``modelyard autoscale`` entry point; returns the exit code."""
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_file(AutoscaleConfig, args.config, SOURCE)
    except ConfigError as exc:
        print(exc.report(), file=sys.stderr)
        return 2
    if args.check:
        print("config ok")
        return 0
    return asyncio.run(serve(cfg))
