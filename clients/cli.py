"""The ``modelyard`` command: one entry point, a subcommand per component.

Each component registers its own subcommands through a ``register(subparsers)``
function, imported lazily so ``modelyard infer`` never pays for the server's imports.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: subcommand -> module that defines ``register(subparsers)``; several subcommands may share a module.
COMMANDS: dict[str, str] = {
    "serve": "modelyard.server.main",
    "balance": "modelyard.balancer.main",
    "autoscale": "modelyard.autoscaler.main",
    "up": "modelyard.autoscaler.up",
    "infer": "modelyard.clients.commands",
    "models": "modelyard.clients.commands",
    "health": "modelyard.clients.commands",
    "bench": "modelyard.clients.commands",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelyard",
        description="modelyard: KServe v2 / Triton-compatible gRPC model server, load balancer and tools.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    done: set[str] = set()
    for name, module in COMMANDS.items():
        if module in done or (only is not None and name != only):
            continue
        importlib.import_module(module).register(sub)
        done.add(module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    # Import only the module the chosen subcommand needs (fast start for client commands).
    only = args_list[0] if args_list and args_list[0] in COMMANDS else None
    parser = build_parser(only)
    args = parser.parse_args(args_list)
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
