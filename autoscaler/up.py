"""``modelyard up``: the whole local stack from one YAML file -- balancer, replicas per pool, autoscaler.

    modelyard up                       # the built-in stack (demo models, two pools, 1-4 replicas each)
    modelyard up --config stack.yaml   # your pools and models
    modelyard up --demo                # the built-in stack + stepped traffic, a summary and a PNG, then exit

The balancer runs as a child process; the autoscaler runs in this process with the ``local``
actuator, whose replicas (``modelyard serve``) are child processes too. A live terminal view
shows pools, replicas and their state, RPS, p50/p99 and the last decisions. Ctrl-C (or SIGTERM)
stops everything: traffic, autoscaler, balancer (it drains), then every replica -- no process is
left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from modelyard.autoscaler.config import SOURCE as AUTOSCALE_SOURCE
from modelyard.autoscaler.config import AutoscaleConfig
from modelyard.autoscaler.policy import PolicyConfig
from modelyard.config import Check, ConfigError, load, override, read_yaml, to_dict
from modelyard.launcher import BalancerProcess, Process, modelyard_argv, print_ready

log = logging.getLogger("modelyard.up")
SOURCE = "stack config"


@dataclass
class StackPool:
    """One pool of replicas: the models it serves (requests for them are routed to it) and how it scales."""

    #: models each replica loads; requests naming them go to this pool (the first pool takes the rest)
    models: list[str] = field(default_factory=list)
    #: model repository (empty = the built-in demo models)
    model_repository: str = ""
    #: more ``modelyard serve`` arguments for each replica
    serve_args: list[str] = field(default_factory=list)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    #: balancer pool settings merged over the defaults (picker, health_check, activator, ...)
    balancer: dict[str, Any] = field(default_factory=dict)
    #: seconds a replica may take to become healthy
    start_timeout: float = 60.0

    def validate(self, check: Check) -> None:
        check(self.start_timeout > 0, "start_timeout", "must be > 0")


@dataclass
class Traffic:
    """A load generator (``modelyard bench`` open loop) for ``--demo`` / ``--traffic``."""

    model: str = ""
    #: ``NAME=VALUE`` inputs as ``modelyard bench -i`` takes them
    inputs: list[str] = field(default_factory=list)
    #: ``RATE:SECONDS`` steps and ``RATE1..RATE2:SECONDS`` ramps
    profile: str = "20:10"

    def validate(self, check: Check) -> None:
        check(bool(self.model), "model", "is required")


@dataclass
class StackConfig:
    """The local stack."""

    #: the balancer's gRPC address (what clients use)
    listen: str = "127.0.0.1:9001"
    #: the balancer's REST (HTTP/1.1) address: KServe v2 REST and the OpenAI-style paths (null: none)
    rest_listen: str | None = "127.0.0.1:9000"
    #: the balancer's admin API
    balancer_admin: str = "127.0.0.1:9901"
    #: the autoscaler's /metrics and /status (null: none)
    autoscaler_admin: str | None = "127.0.0.1:9902"
    #: seconds between two autoscaling decisions
    tick: float = 1.0
    pools: dict[str, StackPool] = field(default_factory=dict)
    traffic: list[Traffic] = field(default_factory=list)

    def validate(self, check: Check) -> None:
        check(bool(self.pools), "pools", "at least one pool is required")
        seen: dict[str, str] = {}
        for name, pool in self.pools.items():
            for m in pool.models:
                if m in seen:
                    check.fail(f"pools.{name}.models", f"model {m!r} is already served by pool {seen[m]!r}")
                seen[m] = name


#: the built-in stack: the demo models in two pools; text_embed_demo simulates an accelerator (see its config)
DEFAULT_STACK = """
listen: 127.0.0.1:9001
rest_listen: 127.0.0.1:9000
balancer_admin: 127.0.0.1:9901
autoscaler_admin: 127.0.0.1:9902
tick: 1.0
pools:
  text:                       # CPU text models; text_embed_demo's replicas are bounded by their instance
    models: [text_embed_demo, text_sentiment_demo]
    policy: {mode: concurrency, target: 3, min_replicas: 1, max_replicas: 4,
             stable_window: 20, panic_window: 4, scale_down_delay: 5}
  tools:                      # the small demo models, scaled on requests per second
    models: [identity, add_sub, token_stream_demo]
    policy: {mode: rps, target: 300, min_replicas: 1, max_replicas: 4, stable_window: 20, panic_window: 4}
traffic:
  - model: text_embed_demo
    inputs: ['TEXT=["a sentence to embed"]']
    profile: "25:8,220:22,25:28"
  - model: identity
    inputs: ["INPUT0=[1.0,2.0,3.0,4.0]"]
    profile: "20:58"
"""


def balancer_document(cfg: StackConfig) -> dict[str, Any]:
    """The ``modelyard balance`` config of a stack: one pool per stack pool, routes by model name."""
    first = next(iter(cfg.pools))
    routes = [{"match": {"model": m}, "pool": name} for name, p in cfg.pools.items() for m in p.models]
    routes.append({"match": {}, "pool": first})
    pools = {}
    for name, p in cfg.pools.items():
        pools[name] = {
            "picker": "least_latency",
            "endpoints": {"static": []},
            "health_check": {"interval": 1.0, "timeout": 1.0},
            # a pool at zero (or still starting) holds requests instead of failing them
            "activator": {"enabled": True, "timeout": max(30.0, p.start_timeout)},
            **p.balancer,
        }
    doc: dict[str, Any] = {"listeners": [{"address": cfg.listen}], "admin": {"address": cfg.balancer_admin},
                           "drain": {"grace": 10}, "routes": routes, "pools": pools}
    if cfg.rest_listen:
        doc["rest"] = {"listeners": [{"address": cfg.rest_listen}]}
    return doc


def autoscale_document(cfg: StackConfig, balancer_admin: str, admin: str | None) -> dict[str, Any]:
    """The autoscaler config of a stack (local actuator, metrics from the balancer and the replicas)."""
    return {"tick": cfg.tick, "admin": admin, "pools": {
        name: {"policy": to_dict(p.policy),
               "source": {"balancer_admin": balancer_admin, "models": p.models},
               "actuator": {"kind": "local", "local": {
                   "model_repository": p.model_repository, "models": p.models, "serve_args": p.serve_args,
                   "balancer_admin": balancer_admin, "start_timeout": p.start_timeout}}}
        for name, p in cfg.pools.items()}}


# ------------------------------------------------------------------ the run


@dataclass
class Timeline:
    """What ``--demo`` plots: per second, each pool's replicas (asked / ready / desired) and load."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, t: float, status: dict[str, Any]) -> None:
        self.rows.append({"t": round(t, 2), "pools": {
            name: {"replicas": p["replicas"], "ready": p["ready"], "desired": p["desired"], "panic": p["panic"],
                   "rps": p["load"].get("rps"), "p99_ms": p["load"].get("p99_ms")}
            for name, p in status.items()}})


class Stack:
    """The running stack (balancer process, autoscaler, replicas); :meth:`stop` takes it all down."""

    def __init__(self, cfg: StackConfig) -> None:
        self.cfg = cfg
        self.balancer: BalancerProcess | None = None
        self.daemon: Any = None
        self.traffic: list[tuple[Traffic, Process, Path]] = []
        self.t0 = time.monotonic()

    async def start(self, ready_timeout: float = 120.0) -> None:
        from modelyard.autoscaler.daemon import Autoscaler

        loop = asyncio.get_running_loop()
        self.balancer = BalancerProcess(config=balancer_document(self.cfg), extra_args=["--log-level", "WARNING"],
                                        name="balance")
        eps = await loop.run_in_executor(None, self.balancer.start)
        assert eps is not None
        doc = autoscale_document(self.cfg, eps.admin, self.cfg.autoscaler_admin)
        self.daemon = Autoscaler(load(AutoscaleConfig, doc, source=AUTOSCALE_SOURCE))
        await self.daemon.start()
        deadline = time.monotonic() + ready_timeout
        while True:
            st = self.daemon.status()
            if all(p["ready"] >= self.cfg.pools[n].policy.min_replicas for n, p in st.items()):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"replicas not ready after {ready_timeout:.0f}s: "
                                   + "; ".join(e["text"] for p in st.values() for e in p["events"]))
            await asyncio.sleep(0.1)

    @property
    def grpc(self) -> str:
        assert self.balancer is not None and self.balancer.endpoints is not None
        return self.balancer.endpoints.grpc

    @property
    def admin(self) -> str:
        assert self.balancer is not None and self.balancer.endpoints is not None
        return self.balancer.endpoints.admin

    @property
    def http(self) -> str | None:
        """The balancer's REST address (None without one)."""
        assert self.balancer is not None and self.balancer.endpoints is not None
        return self.balancer.endpoints.http or None

    def start_traffic(self, traffic: list[Traffic], workdir: Path) -> None:
        for i, t in enumerate(traffic):
            out = workdir / f"traffic-{i}-{t.model}.json"
            args = ["bench", t.model, "--url", self.grpc, "--profile", t.profile, "--timeline", str(out),
                    "--no-progress", "--timeout", "30"]
            for value in t.inputs:
                args += ["-i", value]
            proc = Process(modelyard_argv(*args), ready=None, name=f"bench-{t.model}")
            proc.start()
            self.traffic.append((t, proc, out))

    def traffic_done(self) -> bool:
        return all(not p.alive() for _, p, _ in self.traffic)

    async def stop(self) -> None:
        """Traffic, autoscaler, balancer (drains), replicas -- in that order, everything waited for."""
        loop = asyncio.get_running_loop()
        for _, proc, _ in self.traffic:
            await loop.run_in_executor(None, proc.stop, 5.0)
        if self.daemon is not None:
            self.daemon.stop()
        if self.balancer is not None:
            await loop.run_in_executor(None, self.balancer.stop, 15.0)
        if self.daemon is not None:
            await self.daemon.close(stop_replicas=True)


async def run(cfg: StackConfig, *, traffic: list[Traffic], view: bool, exit_after_traffic: bool,
              tour: bool = False) -> tuple[int, Stack, Timeline]:
    """Start the stack, show it until Ctrl-C (or the traffic ends), stop it; (exit code, stack, timeline)."""
    stack = Stack(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    timeline = Timeline()
    workdir = Path(tempfile.mkdtemp(prefix="modelyard-up-"))
    live: Any = None
    try:
        try:
            await stack.start()
        except (RuntimeError, ConfigError) as exc:
            print(f"modelyard up: {exc}", file=sys.stderr)
            return 1, stack, timeline
        print_ready(grpc=stack.grpc, http=stack.http, admin=stack.admin,
                    autoscaler=f"{cfg.autoscaler_admin.rpartition(':')[0]}:{stack.daemon.admin_port}"
                    if cfg.autoscaler_admin and stack.daemon.admin_port else None, pools=",".join(cfg.pools))
        if tour:
            from modelyard.clients.demo import demo_steps, run_steps

            failed = await loop.run_in_executor(None, run_steps, demo_steps(stack.grpc, stack.admin))
            if failed:
                print(f"\ndemo: {len(failed)} tour step(s) failed: {'; '.join(failed)}", file=sys.stderr)
                return 1, stack, timeline
            print("\n=== stepped traffic through the balancer; the autoscaler follows it", flush=True)
        if traffic:
            stack.start_traffic(traffic, workdir)
        total = max((sum(s.seconds for s in _segments(t.profile)) for t in traffic), default=0.0)
        if view:
            from rich.console import Console
            from rich.live import Live

            from modelyard.autoscaler.view import render

            live = Live(console=Console(), refresh_per_second=4, transient=False)
            live.start()
        t_start = time.monotonic()
        last_row = last_line = 0.0
        while not stop.is_set():
            now = time.monotonic() - t_start
            status = stack.daemon.status()
            if now - last_row >= 1.0:
                timeline.add(now, status)
                last_row = now
            if live is None and now - last_line >= 5.0:
                from modelyard.autoscaler.view import plain

                print(f"[{now:5.0f}s] {plain(status)}", file=sys.stderr, flush=True)
                last_line = now
            if live is not None:
                rest = f" (REST http://{stack.http})" if stack.http else ""
                header = (f"modelyard up -- clients: {stack.grpc}{rest}   balancer admin: http://{stack.admin}   "
                          f"Ctrl-C stops everything")
                footer = f"traffic {now:.0f}/{total:.0f}s" if traffic else ""
                live.update(render(status, header, footer))
            if traffic and exit_after_traffic and stack.traffic_done():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
    finally:
        if live is not None:
            live.stop()
        print("stopping: traffic, autoscaler, balancer, replicas ...", file=sys.stderr, flush=True)
        await stack.stop()
    return 0, stack, timeline


def report_traffic(stack: Stack, timeline: Timeline, plot: Path | None, timeline_file: Path | None) -> int:
    """After a run with traffic: the summary, the timeline file and the plot; 1 when a request failed."""
    reports = [(t, json.loads(out.read_text())) for t, _, out in stack.traffic if out.exists()]
    code = summarize(reports, timeline)
    if timeline_file is not None:
        timeline_file.write_text(json.dumps({"timeline": timeline.rows,
                                             "traffic": [{"model": t.model, "profile": t.profile, "report": r}
                                                         for t, r in reports]}, indent=1))
    if plot is not None:
        draw(plot, reports, timeline)
    return code


def _segments(profile: str) -> list[Any]:
    from modelyard.clients.bench import parse_profile

    return parse_profile(profile)


def summarize(reports: list[tuple[Traffic, dict[str, Any]]], timeline: Timeline) -> int:
    """Print what the traffic saw and how the pools moved; 1 when any request failed or traffic is missing."""
    failed = 0
    print("\nsummary")
    for t, r in reports:
        lat = r.get("latency_ms", {})
        failed += int(r.get("errors", 0))
        print(f"  {t.model:<20} profile {t.profile:<22} sent {r.get('count', 0):>6}  failed {r.get('errors', 0):>4}  "
              f"p50 {lat.get('p50', 0):7.2f} ms  p99 {lat.get('p99', 0):7.2f} ms  {r.get('errors_by_code') or ''}")
    pools = sorted({name for row in timeline.rows for name in row["pools"]})
    for name in pools:
        series = [row["pools"][name]["replicas"] for row in timeline.rows if name in row["pools"]]
        ready = [row["pools"][name]["ready"] for row in timeline.rows if name in row["pools"]]
        if series:
            print(f"  pool {name:<15} replicas min {min(series)} max {max(series)} final {series[-1]}; "
                  f"ready max {max(ready)}; changes {sum(1 for a, b in itertools.pairwise(series) if a != b)}")
    if not reports:
        print("  no traffic report (the load generator did not finish)")
        return 1
    print(f"  {'no request failed' if not failed else f'{failed} request(s) failed'}")
    return 1 if failed else 0


def draw(path: Path, reports: list[tuple[Traffic, dict[str, Any]]], timeline: Timeline) -> None:
    """PNG: per pool, requests/s sent and answered, replicas (asked and ready) and p99 over time."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(matplotlib is not installed: no plot written to {path}; pip install modelyard[demo])")
        return
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    for t, r in reports:
        tl = r.get("timeline", [])
        xs = [row["t"] for row in tl]
        axes[0].plot(xs, [row["sent"] for row in tl], label=f"{t.model} sent")
        axes[0].plot(xs, [row["ok"] for row in tl], linestyle="--", label=f"{t.model} answered")
        axes[2].plot(xs, [row["p99_ms"] for row in tl], label=f"{t.model} p99")
    xs = [row["t"] for row in timeline.rows]
    for name in sorted({n for row in timeline.rows for n in row["pools"]}):
        axes[1].step(xs, [row["pools"][name]["replicas"] for row in timeline.rows], where="post", label=f"{name} asked")
        axes[1].step(xs, [row["pools"][name]["ready"] for row in timeline.rows], where="post", linestyle="--",
                     label=f"{name} ready")
    axes[0].set_ylabel("requests/s")
    axes[1].set_ylabel("replicas")
    axes[2].set_ylabel("p99 (ms)")
    axes[2].set_xlabel("seconds")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    fig.suptitle("modelyard up: traffic, replicas, p99")
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    print(f"  plot: {path}")


def register(subparsers: Any) -> None:
    """Add the ``up`` subcommand."""
    p = subparsers.add_parser(
        "up", help="run the whole local stack: balancer, autoscaled replicas per pool, live view",
        description="Start the balancer, one pool of modelyard serve replicas per pool of the config (built-in: "
        "the demo models in two pools) and the autoscaler (local actuator); show a live view until Ctrl-C, "
        "which stops every process.")
    p.add_argument("--config", metavar="FILE", help="stack YAML (listen, balancer_admin, pools, traffic); default: built-in")
    p.add_argument("--demo", action="store_true",
                   help="(built-in stack: a tour of CLI calls through the balancer, then) send the config's traffic "
                        "profiles, print a summary, write a PNG and exit")
    p.add_argument("--traffic", action="store_true", help="send the config's traffic profiles (keeps running after)")
    p.add_argument("--plot", metavar="PNG", help="with traffic: where to write the plot (default with --demo: "
                   "modelyard-demo.png)")
    p.add_argument("--timeline", metavar="JSON", help="with traffic: write the per-second timeline and reports here")
    p.add_argument("--no-view", action="store_true", help="no live terminal view (plain status lines on stderr)")
    p.add_argument("--listen", metavar="HOST:PORT", help="the balancer's gRPC address (overrides the config; :0 = any free port)")
    p.add_argument("--rest-listen", metavar="HOST:PORT",
                   help="the balancer's REST (HTTP/1.1) address (overrides the config; :0 = any free port)")
    p.add_argument("--balancer-admin", metavar="HOST:PORT", help="the balancer's admin address (overrides the config)")
    p.add_argument("--autoscaler-admin", metavar="HOST:PORT", help="the autoscaler's /metrics address (overrides the config)")
    p.add_argument("--print-config", action="store_true", help="print the effective stack config as YAML and exit")
    p.add_argument("--log-level", default="WARNING", help="logging level (default WARNING; the view shows decisions)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        data = read_yaml(args.config, SOURCE) if args.config else yaml.safe_load(DEFAULT_STACK)
        if not isinstance(data, dict):
            raise ConfigError(["<root>: expected a mapping"], SOURCE)
        data = override(data, {"listen": args.listen, "rest_listen": args.rest_listen,
                               "balancer_admin": args.balancer_admin,
                               "autoscaler_admin": args.autoscaler_admin})
        cfg = load(StackConfig, data, source=SOURCE)
    except ConfigError as exc:
        print(exc.report(), file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    traffic = cfg.traffic if (args.demo or args.traffic) else []
    plot = Path(args.plot) if args.plot else (Path("modelyard-demo.png") if args.demo else None)
    view = not args.no_view and sys.stdout.isatty()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    # the tour calls the built-in demo models: only with the built-in stack
    code, stack, timeline = asyncio.run(run(cfg, traffic=traffic, view=view, exit_after_traffic=args.demo,
                                            tour=args.demo and not args.config))
    if code == 0 and traffic:
        code = report_traffic(stack, timeline, plot, Path(args.timeline) if args.timeline else None)
    return code
