"""Real ``modelyard serve`` replicas behind a real ``modelyard balance`` process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from modelyard import launcher
from modelyard.protos import grpc_service_pb2 as pb

INFER = "/inference.GRPCInferenceService/ModelInfer"


class BalancerProcess(launcher.BalancerProcess):
    """``modelyard balance --config`` in a subprocess, started on construction."""

    def __init__(self, config: dict[str, Any], timeout: float = 30.0) -> None:
        super().__init__(config=config, extra_args=["--log-level", "WARNING"], start_timeout=timeout)
        self.start()

    def admin(self, path: str, body: dict[str, Any] | None = None) -> Any:
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}{path}",
                                     data=None if body is None else json.dumps(body).encode(),
                                     method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())

    def kill(self) -> None:
        self.stop(timeout=0)


@contextlib.contextmanager
def balancer(endpoints: list[str], workers: int = 1, **pool: Any) -> Iterator[BalancerProcess]:
    port = launcher.free_port() if workers > 1 else 0
    cfg = {
        "listeners": [{"address": f"127.0.0.1:{port}"}],
        "admin": {"address": "127.0.0.1:0"},
        "workers": workers,
        "drain": {"grace": 5},
        "pools": {"models": {
            "picker": "peak_ewma",
            "endpoints": {"static": endpoints},
            "health_check": {"interval": 0.2, "timeout": 0.5, "unhealthy_threshold": 1},
            "outlier_detection": {"consecutive_failures": 2, "base_ejection_time": 5},
            **pool,
        }},
    }
    b = BalancerProcess(cfg)
    try:
        yield b
    finally:
        b.kill()


def infer_request(i: int) -> bytes:
    req = pb.ModelInferRequest(model_name="identity", id=str(i))
    req.inputs.add(name="INPUT0", datatype="INT32", shape=[1])
    req.raw_input_contents.append(i.to_bytes(4, "little"))
    return req.SerializeToString()


class Load:
    """Closed-loop unary ModelInfer traffic from a thread-owned event loop; counts results."""

    def __init__(self, port: int, concurrency: int = 4) -> None:
        self.port, self.concurrency = port, concurrency
        self.ok = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()

    async def _run(self) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as ch:
            call = ch.unary_unary(INFER)

            async def worker(w: int) -> None:
                i = w
                while not self._stop.is_set():
                    i += self.concurrency
                    try:
                        resp = pb.ModelInferResponse.FromString(await call(infer_request(i), timeout=10))
                        assert resp.raw_output_contents[0] == i.to_bytes(4, "little")
                        self.ok += 1
                    except grpc.aio.AioRpcError as e:
                        self.failed.append(f"{e.code().name}: {e.details()}")

            await asyncio.gather(*(worker(w) for w in range(self.concurrency)))

    def wait_ok(self, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        target = self.ok + n
        while self.ok < target:
            assert time.monotonic() < deadline, f"only {self.ok}/{target} ok; failures {self.failed[:3]}"
            assert self._thread.is_alive()
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


@pytest.fixture
def replicas(start_server: Any) -> list[Any]:
    return [start_server("--model", "identity", "--grace", "5") for _ in range(2)]


def test_killing_a_replica_fails_no_unary_request(replicas: list[Any]) -> None:
    with balancer([r.grpc_url for r in replicas]) as b:
        load = Load(b.port, concurrency=8)
        try:
            load.wait_ok(200)
            replicas[0].proc.send_signal(signal.SIGKILL)
            replicas[0].proc.wait(10)
            load.wait_ok(400)
        finally:
            load.stop()
        assert load.failed == []
        rows = {r["address"]: r for r in b.admin("/endpoints")["endpoints"]}
        dead = rows[replicas[0].grpc_url]
        assert not dead["routable"]


def test_draining_a_replica_fails_no_request(replicas: list[Any], poll: Any) -> None:
    with balancer([r.grpc_url for r in replicas]) as b:
        load = Load(b.port, concurrency=8)
        try:
            load.wait_ok(100)
            b.admin("/endpoints/drain", {"pool": "models", "address": replicas[0].grpc_url})

            def drained() -> bool:
                rows = {r["address"]: r for r in b.admin("/endpoints")["endpoints"]}
                return rows[replicas[0].grpc_url]["outstanding"] == 0
            poll(drained, timeout=10, message="in-flight requests of the drained replica")
            assert replicas[0].terminate(15) == 0
            load.wait_ok(300)
        finally:
            load.stop()
        assert load.failed == []


def test_sigterm_drains_in_flight_and_exits_zero(replicas: list[Any]) -> None:
    with balancer([replicas[0].grpc_url]) as b:
        load = Load(b.port, concurrency=4)
        try:
            load.wait_ok(50)
            b.proc.send_signal(signal.SIGTERM)
            assert b.proc.wait(15) == 0
        finally:
            load.stop()
        # only requests sent after the listener closed fail: refused at connect (UNAVAILABLE) or refused by
        # grpc's shutting-down server (CANCELLED); nothing else, and the process exits 0 within the grace
        assert all(f.startswith(("UNAVAILABLE", "CANCELLED")) for f in load.failed), set(load.failed)


def test_worker_processes_share_the_port_and_report_to_admin(replicas: list[Any], poll: Any) -> None:
    with balancer([r.grpc_url for r in replicas], workers=2) as b:
        load = Load(b.port, concurrency=4)
        try:
            load.wait_ok(100)
        finally:
            load.stop()
        assert load.failed == []
        poll(lambda: sum(r["requests"] for r in b.admin("/endpoints")["endpoints"]) >= 100, timeout=5,
             message="worker stats reported to the control process")


def test_invalid_config_refuses_to_start_listing_errors(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("workers: 0\npools:\n  a: {picker: nope, endpoints: {static: [bad]}}\n")
    out = subprocess.run([sys.executable, "-m", "modelyard.clients.cli", "balance", "--config", str(f)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    for needle in ("workers: must be >= 1", "pools.a.picker: unknown picker", "pools.a.endpoints.static[0].address"):
        assert needle in out.stderr


def test_per_model_health_takes_a_replica_out_while_its_model_is_unloaded(replicas: list[Any], poll: Any) -> None:
    cfg = {
        "listeners": [{"address": "127.0.0.1:0"}],
        "admin": {"address": "127.0.0.1:0"},
        "routes": [{"match": {"model": "identity"}, "pool": "models"}, {"match": {}, "pool": "models"}],
        "pools": {"models": {
            "picker": "round_robin",
            "endpoints": {"static": [r.grpc_url for r in replicas]},
            "health_check": {"interval": 0.2, "timeout": 0.5, "unhealthy_threshold": 1, "per_model": True},
        }},
    }
    b = BalancerProcess(cfg)
    gone = replicas[0].grpc_url

    def routable() -> dict[str, bool]:
        return {r["address"]: r["routable"] for r in b.admin("/endpoints")["endpoints"]}

    try:
        poll(lambda: all(routable().values()), timeout=10, message="both replicas healthy")
        with grpc.insecure_channel(gone) as ch:
            ch.unary_unary("/inference.GRPCInferenceService/RepositoryModelUnload")(
                pb.RepositoryModelUnloadRequest(model_name="identity").SerializeToString(), timeout=10)
        # The server as a whole stays SERVING; only the per-model check ("identity") sees the unload.
        poll(lambda: not routable()[gone], timeout=10, message="the replica without the model leaves the pool")
        with grpc.insecure_channel(f"127.0.0.1:{b.port}") as ch:
            call = ch.unary_unary(INFER)
            for i in range(40):
                assert pb.ModelInferResponse.FromString(call(infer_request(i), timeout=10)).raw_output_contents
        with grpc.insecure_channel(gone) as ch:
            ch.unary_unary("/inference.GRPCInferenceService/RepositoryModelLoad")(
                pb.RepositoryModelLoadRequest(model_name="identity").SerializeToString(), timeout=30)
        poll(lambda: routable()[gone], timeout=10, message="the replica comes back once the model is loaded")
    finally:
        b.kill()
