"""The live view of ``modelyard up`` renders what the autoscaler's /status holds."""

from __future__ import annotations

from rich.console import Console

from modelyard.autoscaler.view import plain, render

STATUS = {
    "text": {"replicas": 3, "ready": 2, "desired": 3, "panic": True, "mode": "concurrency", "reason": "", "kind": "panic",
             "load": {"rps": 220.4, "concurrency": 8.7, "p50_ms": 14.2, "p99_ms": 48.0, "held": 0},
             "replica_list": [{"name": "text-1", "state": "ready", "grpc": "127.0.0.1:4001", "pid": 11, "start_s": 0.7},
                              {"name": "text-2", "state": "starting", "grpc": "", "pid": 12, "start_s": None}],
             "decisions": [{"time": 1000.0, "desired": 3, "kind": "panic", "reason": "panic: concurrency 8.7 ..."}],
             "events": [{"time": 1001.0, "text": "text-1 ready in 0.7s"}]},
}


def test_the_view_shows_pools_replicas_and_decisions() -> None:
    console = Console(record=True, width=160)
    console.print(render(STATUS, "header", "footer"))
    text = console.export_text()
    for needle in ("text", "PANIC", "220.4", "48.0", "text-1", "starting", "panic: concurrency 8.7", "ready in 0.7s"):
        assert needle in text


def test_the_plain_line_for_logs() -> None:
    assert plain(STATUS) == "text: replicas 3 ready 2 desired 3 PANIC rps 220.4 p99 48.0 ms"
