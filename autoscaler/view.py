"""The live terminal view of ``modelyard up`` (rich): pools, replicas and their state, load, decisions."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

STATE_STYLE = {"ready": "green", "starting": "yellow", "draining": "magenta", "stopping": "red"}


def _num(value: Any, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def render(status: dict[str, Any], header: str = "", footer: str = "") -> Group:
    """One frame: a summary row per pool, its replicas, and its last decisions and events."""
    parts: list[Any] = []
    if header:
        parts.append(Text(header, style="bold"))
    pools = Table(title="pools", title_justify="left", expand=False)
    for col in ("pool", "mode", "replicas", "ready", "desired", "panic", "req/s", "in flight", "p50 ms", "p99 ms",
                "held"):
        pools.add_column(col, justify="left" if col in ("pool", "mode") else "right")
    for name, p in status.items():
        load = p.get("load", {})
        pools.add_row(name, p["mode"], str(p["replicas"]), str(p["ready"]), _num(p["desired"], "{}"),
                      Text("PANIC", style="bold red") if p["panic"] else Text("-"),
                      _num(load.get("rps")), _num(load.get("concurrency")), _num(load.get("p50_ms")),
                      _num(load.get("p99_ms")), str(load.get("held", 0)))
    parts.append(pools)
    reps = Table(title="replicas", title_justify="left")
    for col in ("pool", "replica", "state", "gRPC", "pid", "start s"):
        reps.add_column(col)
    for name, p in status.items():
        for r in p["replica_list"]:
            reps.add_row(name, r.get("name", ""), Text(r.get("state", ""), style=STATE_STYLE.get(r.get("state"), "")),
                         r.get("grpc", ""), _num(r.get("pid"), "{}"), _num(r.get("start_s"), "{:.2f}"))
    parts.append(reps)
    recent = Table(title="last decisions and events", title_justify="left")
    recent.add_column("time")
    recent.add_column("pool")
    recent.add_column("what", overflow="fold")
    rows = []
    for name, p in status.items():
        rows += [(d["time"], name, f"[{d['kind']}] {d['reason']}") for d in p["decisions"][-4:]]
        rows += [(e["time"], name, e["text"]) for e in p["events"][-4:]]
    for t, name, what in sorted(rows)[-8:]:
        recent.add_row(time.strftime("%H:%M:%S", time.localtime(t)), name, what)
    parts.append(recent)
    if footer:
        parts.append(Text(footer, style="dim"))
    return Group(*parts)


def plain(status: dict[str, Any]) -> str:
    """One line per pool, for logs and non-terminal output."""
    out = []
    for name, p in status.items():
        load = p.get("load", {})
        out.append(f"{name}: replicas {p['replicas']} ready {p['ready']} desired {p['desired']} "
                   f"{'PANIC ' if p['panic'] else ''}rps {_num(load.get('rps'))} p99 {_num(load.get('p99_ms'))} ms")
    return " | ".join(out)
