"""How the CLI shows things: rich tables for people, plain JSON for scripts."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from rich.table import Table
from rich.text import Text

from modelyard.clients.bench import PERCENTILES, BenchReport
from modelyard.clients.results import InferResult
from modelyard.protos import grpc_service_pb2 as pb

#: longest value shown in a table cell before it is cut short (the JSON output is never cut)
MAX_CELL_CHARS = 400


def jsonable(arr: np.ndarray) -> Any:
    """Nested lists of python values; BYTES elements become text (undecodable bytes escaped)."""
    if arr.dtype == object:
        flat = [
            x.decode("utf-8", errors="backslashreplace") if isinstance(x, bytes) else x for x in arr.reshape(-1)
        ]
        return np.array(flat, dtype=object).reshape(arr.shape).tolist()
    return arr.tolist()


def result_dict(result: InferResult) -> dict[str, Any]:
    """A result as JSON-ready data."""
    return {
        "model": result.model,
        "version": result.version,
        "id": result.id,
        "parameters": result.parameters,
        "outputs": {
            name: {"datatype": result.datatypes.get(name, ""), "shape": list(arr.shape), "data": jsonable(arr)}
            for name, arr in result.outputs.items()
        },
    }


def _cell(arr: np.ndarray) -> Text:
    text = json.dumps(jsonable(arr), ensure_ascii=False)
    if len(text) > MAX_CELL_CHARS:
        text = text[: MAX_CELL_CHARS - 1] + "…"
    return Text(text)


def print_json(data: Any) -> None:
    """One JSON document on one line, no rich markup: for scripts and ``jq``."""
    print(json.dumps(data, ensure_ascii=False), flush=True)


def result_table(result: InferResult) -> Table:
    table = Table(title=f"{result.model} (version {result.version or '-'})", title_justify="left")
    table.add_column("output", style="bold")
    table.add_column("datatype")
    table.add_column("shape")
    table.add_column("value", overflow="fold")
    for name, arr in result.outputs.items():
        table.add_row(name, result.datatypes.get(name, ""), str(list(arr.shape)), _cell(arr))
    return table


def stream_table(model: str, results: Sequence[InferResult]) -> Table:
    names: list[str] = []
    for r in results:
        names.extend(n for n in r.outputs if n not in names)
    table = Table(title=f"{model}: {len(results)} streamed response(s)", title_justify="left")
    table.add_column("#", justify="right")
    for name in names:
        table.add_column(name, overflow="fold")
    table.add_column("final")
    for i, r in enumerate(results):
        cells = [_cell(r.outputs[n]) if n in r.outputs else Text("-") for n in names]
        table.add_row(str(i), *cells, "yes" if r.final else "")
    return table


def index_table(models: Iterable[pb.RepositoryIndexResponse.ModelIndex]) -> Table:
    table = Table(title="models", title_justify="left")
    for column in ("name", "version", "state", "reason"):
        table.add_column(column)
    for m in models:
        style = "green" if m.state == "READY" else "yellow"
        table.add_row(m.name, m.version or "-", Text(m.state, style=style), m.reason)
    return table


def health_summary(live: bool, ready: bool, server_health: str) -> Text:
    ok = live and ready
    return Text(f"server: live={live} ready={ready} grpc.health={server_health}", style="green" if ok else "red")


def health_table(models: Sequence[tuple[str, bool, str]]) -> Table:
    table = Table(title="models", title_justify="left")
    table.add_column("model")
    table.add_column("ready")
    table.add_column("grpc.health")
    for name, ok, status in models:
        table.add_row(name, Text("yes" if ok else "no", style="green" if ok else "red"), status)
    return table


def bench_table(report: BenchReport) -> Table:
    how = f"open loop {report.profile}" if report.profile else f"concurrency {report.concurrency}"
    table = Table(title=f"bench {report.model}: {how}", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("requests", str(report.count))
    table.add_row("errors", str(report.error_count))
    for code, n in sorted(report.errors.items()):
        table.add_row(f"  {code}", str(n))
    table.add_row("elapsed (s)", f"{report.elapsed_s:.3f}")
    table.add_row("throughput (req/s)", f"{report.rps:.1f}")
    for q in PERCENTILES:
        table.add_row(f"latency p{q:g} (ms)", f"{report.latency_ms(q):.3f}")
    return table
