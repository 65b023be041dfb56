"""``modelyard infer | models | health | bench``: the client side of the CLI."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from rich.console import Console

from modelyard.clients.aio import AsyncInferenceClient
from modelyard.clients.bench import BenchReport, Segment, parse_profile, run_bench, run_open_loop
from modelyard.clients.channel import DEFAULT_URL
from modelyard.clients.client import InferenceClient
from modelyard.clients.errors import InferenceServerError
from modelyard.clients.inputs import (
    ANY,
    InputError,
    TensorSpec,
    normalize_datatype,
    parse_input,
    split_assignment,
)
from modelyard.clients.render import (
    bench_table,
    health_summary,
    health_table,
    index_table,
    print_json,
    result_dict,
    result_table,
    stream_table,
)
from modelyard.protos import grpc_service_pb2 as pb
from modelyard.security.files import LoadError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


# ---------------------------------------------------------------------- shared plumbing
def _console() -> Console:
    return Console(highlight=False)


def _fail(message: str, code: int) -> int:
    Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {message}", markup=True, soft_wrap=True)
    return code


def _guarded(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Errors become one line on stderr and an exit status, never a traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except InferenceServerError as exc:
            return _fail(f"{exc.code.name}: {exc.message or 'no details'} ({args.url})", EXIT_FAILED)
        except (InputError, LoadError) as exc:
            return _fail(str(exc), EXIT_USAGE)
        except KeyboardInterrupt:
            return _fail("interrupted", 130)

    return run


def _connection(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments both clients take from the connection flags."""
    return {"ssl": args.ssl, "token": args.token, "ca": args.ca, "cert": args.cert, "key": args.key,
            "server_name": args.server_name}


def _client(args: argparse.Namespace) -> InferenceClient:
    return InferenceClient(args.url, **_connection(args))


def _add_connection_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=DEFAULT_URL, metavar="HOST:PORT",
                   help=f"gRPC address of the server or balancer (default {DEFAULT_URL})")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S",
                   help="deadline for each call in seconds (default 30)")
    p.add_argument("--ssl", action="store_true", help="connect with TLS using the system's root certificates")
    p.add_argument("--ca", metavar="PEM", help="connect with TLS, trusting this CA bundle instead of the system's roots")
    p.add_argument("--cert", metavar="PEM", help="client certificate chain for mTLS (with --key; implies TLS)")
    p.add_argument("--key", metavar="PEM", help="private key of --cert")
    p.add_argument("--server-name", metavar="NAME",
                   help="the name the server's certificate must carry, when not the host of --url")
    p.add_argument("--token", metavar="TOKEN", default=os.environ.get("MODELYARD_TOKEN") or None,
                   help="bearer token sent as 'authorization: Bearer TOKEN' metadata "
                        "(default: $MODELYARD_TOKEN; on the command line it shows in the process list)")


def _add_input_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="model name")
    p.add_argument("--input", "-i", action="append", default=[], metavar="NAME=JSON|@file.npy",
                   help="an input tensor: JSON (number, \"string\", nested list) or @path to a .npy file; "
                        "converted to the datatype and shape the model declares (repeatable)")
    p.add_argument("--datatype", "-d", action="append", default=[], metavar="NAME=TYPE",
                   help="override an input's datatype (FP32, INT64, BYTES...), e.g. for models that accept ANY (repeatable)")
    p.add_argument("--version", default="", metavar="V", help="model version (default: the server's choice, the highest)")


def _input_specs(metadata: pb.ModelMetadataResponse) -> dict[str, TensorSpec]:
    specs = {}
    for t in metadata.inputs:
        shape = tuple(int(d) for d in t.shape)
        specs[t.name] = TensorSpec(t.name, t.datatype or ANY, shape or None)
    return specs


def _build_inputs(args: argparse.Namespace, metadata: pb.ModelMetadataResponse) -> dict[str, np.ndarray]:
    if not args.input:
        raise InputError(f"give at least one --input; {metadata.name} takes: "
                         + ", ".join(f"{t.name} {t.datatype} {list(t.shape)}" for t in metadata.inputs))
    specs = _input_specs(metadata)
    datatypes = {}
    for text in args.datatype:
        name, dt = split_assignment(text, "--datatype")
        datatypes[name] = normalize_datatype(dt)
    inputs: dict[str, np.ndarray] = {}
    for text in args.input:
        name, _ = split_assignment(text)
        if specs and name not in specs:
            raise InputError(f"model '{metadata.name}' has no input '{name}'; its inputs: {', '.join(specs)}")
        name, arr = parse_input(text, specs.get(name), datatypes.get(name))
        inputs[name] = arr
    return inputs


# ---------------------------------------------------------------------- infer
@_guarded
def cmd_infer(args: argparse.Namespace) -> int:
    """Send one request (or one streamed request) and print the outputs."""
    console = _console()
    with _client(args) as client:
        metadata = client.model_metadata(args.model, args.version, timeout=args.timeout)
        inputs = _build_inputs(args, metadata)
        kwargs: dict[str, Any] = {
            "outputs": args.output or None, "version": args.version, "request_id": args.id, "timeout": args.timeout,
        }
        if not args.stream:
            result = client.infer(args.model, inputs, **kwargs)
            if args.json:
                print_json(result_dict(result))
            else:
                console.print(result_table(result))
            return EXIT_OK
        results = []
        for result in client.stream_infer(args.model, inputs, **kwargs):
            results.append(result)
            if args.json:
                print_json(result_dict(result))  # JSON lines, as they arrive
        if not args.json:
            console.print(stream_table(args.model, results))
    return EXIT_OK


# ---------------------------------------------------------------------- models
@_guarded
def cmd_models(args: argparse.Namespace) -> int:
    """List the repository index."""
    with _client(args) as client:
        models = client.repository_index(ready=args.ready, timeout=args.timeout)
    if args.json:
        print_json([{"name": m.name, "version": m.version, "state": m.state, "reason": m.reason} for m in models])
    else:
        _console().print(index_table(models))
    return EXIT_OK


# ---------------------------------------------------------------------- health
def _health_of(client: InferenceClient, service: str, timeout: float) -> str:
    try:
        return client.health(service, timeout=timeout)
    except InferenceServerError as exc:
        if exc.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED):
            return "SERVICE_UNKNOWN"
        raise


@_guarded
def cmd_health(args: argparse.Namespace) -> int:
    """Liveness, readiness, per-model readiness and grpc.health.v1 status; exit 1 unless ready."""
    with _client(args) as client:
        live = client.is_server_live(timeout=args.timeout)
        ready = client.is_server_ready(timeout=args.timeout)
        server_health = _health_of(client, "", args.timeout)
        names = args.model or list(dict.fromkeys(m.name for m in client.repository_index(timeout=args.timeout)))
        models = [
            (name, client.is_model_ready(name, timeout=args.timeout), _health_of(client, name, args.timeout))
            for name in names
        ]
    healthy = live and ready and all(ok for _, ok, _ in models if args.model)
    if args.json:
        print_json({
            "live": live, "ready": ready, "health": server_health,
            "models": [{"name": n, "ready": ok, "health": h} for n, ok, h in models],
        })
    else:
        console = _console()
        console.print(health_summary(live, ready, server_health))
        if models:
            console.print(health_table(models))
    return EXIT_OK if healthy else EXIT_FAILED


# ---------------------------------------------------------------------- bench
def _profile_of(args: argparse.Namespace) -> list[Segment] | None:
    """The open-loop schedule from --rate/--profile (None: closed loop)."""
    if args.profile:
        try:
            return parse_profile(args.profile)
        except ValueError as exc:
            raise InputError(f"--profile: {exc}") from None
    if args.rate is not None:
        return [Segment(args.rate, args.rate, args.duration or 10.0)]
    return None


async def _bench(args: argparse.Namespace) -> BenchReport:
    profile = _profile_of(args)
    async with AsyncInferenceClient(args.url, **_connection(args)) as client:
        metadata = await client.model_metadata(args.model, args.version, timeout=args.timeout)
        inputs = _build_inputs(args, metadata)
        if profile is not None:
            report = await _open_loop(args, client, inputs, profile)
        else:
            requests = args.requests if args.requests is not None or args.duration is not None else 1000
            report = await run_bench(
                client, args.model, inputs, concurrency=args.concurrency, requests=requests,
                duration=args.duration, version=args.version, request_timeout=args.timeout,
            )
    return report


async def _open_loop(args: argparse.Namespace, client: AsyncInferenceClient, inputs: dict[str, Any],
                     profile: list[Segment]) -> BenchReport:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    total = sum(seg.seconds for seg in profile)
    text = args.profile or f"{args.rate:g}:{total:g}"
    # the bar goes to stderr so that --json stays parseable on stdout
    with Progress(TextColumn("[bold]open loop[/] {task.description}"), BarColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True, disable=args.no_progress) as bar:
        task = bar.add_task(text, total=total)

        def progress(elapsed: float, sent: int, answered: int) -> None:
            bar.update(task, completed=elapsed, description=f"{text}  sent {sent}  answered {answered}")

        return await run_open_loop(client, args.model, inputs, profile, version=args.version,
                                   request_timeout=args.timeout, max_inflight=args.max_inflight,
                                   profile_text=text, on_progress=progress)


@_guarded
def cmd_bench(args: argparse.Namespace) -> int:
    """Closed-loop load with the asyncio client; prints throughput and latency percentiles."""
    if args.concurrency < 1:
        raise InputError("-c/--concurrency must be at least 1")
    if args.requests is not None and args.requests < 1:
        raise InputError("-n/--requests must be at least 1")
    if args.duration is not None and args.duration <= 0:
        raise InputError("--duration must be positive")
    if args.rate is not None and args.rate <= 0:
        raise InputError("--rate must be positive")
    if args.max_inflight < 1:
        raise InputError("--max-inflight must be at least 1")
    report = asyncio.run(_bench(args))
    if args.timeline:
        Path(args.timeline).write_text(json.dumps(report.as_dict(), indent=1))
    if args.json:
        print_json(report.as_dict())
    else:
        _console().print(bench_table(report))
    return EXIT_OK if report.count > report.error_count else EXIT_FAILED


# ---------------------------------------------------------------------- registration
def register(subparsers: Any) -> None:
    """Add ``infer``, ``models``, ``health`` and ``bench`` to the ``modelyard`` command."""
    p = subparsers.add_parser(
        "infer", help="send an inference request and print the outputs",
        description="Send one request to MODEL. Inputs are converted to the datatype and shape the model's "
                    "metadata declares. Example: modelyard infer add_sub -i INPUT0=[1,2,3,4] -i INPUT1=[1,1,1,1]",
    )
    _add_input_flags(p)
    p.add_argument("--output", "-o", action="append", default=[], metavar="NAME",
                   help="only return this output (repeatable; default: all outputs)")
    p.add_argument("--id", default="", help="request id, echoed in the response")
    p.add_argument("--stream", action="store_true",
                   help="use ModelStreamInfer and print every response (for decoupled/streaming models)")
    p.add_argument("--json", action="store_true", help="print JSON (one line per response) instead of a table")
    _add_connection_flags(p)
    p.set_defaults(func=cmd_infer)

    p = subparsers.add_parser("models", help="list the model repository (name, version, state, reason)",
                              description="List every model in the server's repository and the state of each version.")
    p.add_argument("--ready", action="store_true", help="list ready models only")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_connection_flags(p)
    p.set_defaults(func=cmd_models)

    p = subparsers.add_parser(
        "health", help="check server liveness/readiness and each model's health",
        description="Show server live/ready, grpc.health.v1 status and per-model readiness. "
                    "Exits 1 when the server (or a model named with --model) is not ready.",
    )
    p.add_argument("--model", "-m", action="append", default=[], metavar="NAME",
                   help="check only this model, and require it to be ready (repeatable; default: every model)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_connection_flags(p)
    p.set_defaults(func=cmd_health)

    p = subparsers.add_parser(
        "bench", help="load test (closed loop, or open loop at a rate or profile): throughput and latency percentiles",
        description="Closed loop (default): CONCURRENCY workers, each sending its next request as soon as the "
                    "previous one returns, until -n requests were sent or --duration passed (default: 1000 "
                    "requests). Open loop (--rate or --profile): requests leave on a schedule whatever the answers "
                    "do; --profile 50:10,200:20,20..200:30 is 50 req/s for 10 s, 200 for 20 s, then a ramp.",
    )
    _add_input_flags(p)
    p.add_argument("-c", "--concurrency", type=int, default=1, help="closed loop: requests in flight at once (default 1)")
    p.add_argument("-n", "--requests", type=int, default=None, help="closed loop: stop after this many requests")
    p.add_argument("--duration", type=float, default=None, metavar="S",
                   help="stop after this many seconds (with --rate: how long to send, default 10)")
    p.add_argument("--rate", type=float, default=None, metavar="RPS", help="open loop at a constant rate (req/s)")
    p.add_argument("--profile", default=None, metavar="STEPS",
                   help="open loop on a schedule: RATE:SECONDS steps and RATE1..RATE2:SECONDS ramps, comma-separated")
    p.add_argument("--max-inflight", type=int, default=2000,
                   help="open loop: most requests outstanding; beyond it they count as CLIENT_OVERLOADED (default 2000)")
    p.add_argument("--timeline", metavar="FILE", help="write the report, with the per-second timeline, as JSON to FILE")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (open loop)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_connection_flags(p)
    p.set_defaults(func=cmd_bench)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one client subcommand (``python -m modelyard.clients.commands infer ...``)."""
    parser = argparse.ArgumentParser(prog="modelyard")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["cmd_bench", "cmd_health", "cmd_infer", "cmd_models", "register"]
