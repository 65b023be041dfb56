"""The local actuator with real processes: real ``modelyard serve`` replicas behind a real ``modelyard balance``."""

from __future__ import annotations

import asyncio
import textwrap
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path

import grpc
import pytest

from modelyard.autoscaler.actuators.local import LocalActuator, LocalConfig
from modelyard.launcher import BalancerProcess
from modelyard.launcher import until as launcher_until
from modelyard.protos import grpc_service_pb2 as pb

INFER = "/inference.GRPCInferenceService/ModelInfer"


until = partial(launcher_until, timeout=30.0)


def exited_or_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.fixture
def balancer() -> Iterator[BalancerProcess]:
    cfg = {"listeners": [{"address": "127.0.0.1:0"}], "admin": {"address": "127.0.0.1:0"},
           "pools": {"p": {"picker": "least_conn", "endpoints": {"static": []},
                           "health_check": {"interval": 0.2, "timeout": 0.5},
                           "activator": {"enabled": True, "timeout": 30}}}}
    with BalancerProcess(config=cfg, extra_args=["--log-level", "WARNING"]) as b:
        yield b


def request(i: int) -> bytes:
    req = pb.ModelInferRequest(model_name="identity", id=str(i))
    req.inputs.add(name="INPUT0", datatype="INT32", shape=[1])
    req.raw_input_contents.append(i.to_bytes(4, "little"))
    return req.SerializeToString()


class Load:
    """Closed-loop clients through the balancer, counting every outcome."""

    def __init__(self, address: str, concurrency: int = 4) -> None:
        self.address = address
        self.concurrency = concurrency
        self.ok = 0
        self.failed: Counter[str] = Counter()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async with grpc.aio.insecure_channel(self.address) as ch:
            call = ch.unary_unary(INFER)

            async def worker(w: int) -> None:
                i = 0
                while not self._stop.is_set():
                    i += 1
                    try:
                        await call(request(w * 100000 + i), timeout=20)
                        self.ok += 1
                    except grpc.aio.AioRpcError as e:
                        self.failed[f"{e.code().name}: {e.details()}"] += 1
                    await asyncio.sleep(0.002)

            await asyncio.gather(*(worker(w) for w in range(self.concurrency)))

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task


@pytest.fixture
async def actuator(balancer: BalancerProcess) -> AsyncIterator[LocalActuator]:
    assert balancer.endpoints is not None
    act = LocalActuator("p", LocalConfig(models=["identity"], balancer_admin=balancer.endpoints.admin,
                                         drain_timeout=10, stop_grace=10))
    await act.start()
    try:
        yield act
    finally:
        await act.close(stop_replicas=True)


@pytest.mark.slow
async def test_replicas_follow_the_desired_count_and_no_request_fails(balancer: BalancerProcess,
                                                                      actuator: LocalActuator) -> None:
    assert balancer.endpoints is not None
    await actuator.scale(1)
    await until(lambda: actuator.counts() == (1, 1), what="one ready replica")
    load = Load(balancer.endpoints.grpc)
    load.start()
    await until(lambda: load.ok > 50, what="traffic through the first replica")
    await actuator.scale(3)
    await until(lambda: actuator.counts() == (3, 3), what="three ready replicas")
    before = load.ok
    await until(lambda: load.ok > before + 300, what="traffic after the scale-up")
    rows = [r for r in await actuator.admin.endpoints() if r["pool"] == "p"]
    assert len(rows) == 3 and sum(1 for r in rows if r["requests"] > 0) >= 2, rows
    pids = [r.process.pid for r in actuator.replicas if r.process is not None]
    await actuator.scale(1)
    await until(lambda: actuator.counts() == (1, 1) and len(actuator.replicas) == 1, what="back to one replica")
    before = load.ok
    await until(lambda: load.ok > before + 50, what="traffic after the scale-down")
    await load.stop()
    assert not load.failed, f"requests failed during scale steps: {dict(load.failed)}"
    rows = [r for r in await actuator.admin.endpoints() if r["pool"] == "p"]
    assert len(rows) == 1
    # the two stopped replicas exited (gracefully: SIGTERM after the drain)
    gone = [p for p in pids if p not in [r.process.pid for r in actuator.replicas if r.process]]
    assert len(gone) == 2
    for pid in gone:
        assert exited_or_zombie(pid)


@pytest.mark.slow
async def test_a_replica_that_never_becomes_healthy_is_killed_counted_and_retried(
        balancer: BalancerProcess, tmp_path: Path) -> None:
    assert balancer.endpoints is not None
    # the model's first load hangs (past the start timeout); the next one is fine
    marker = tmp_path / "hung-once"
    model = tmp_path / "repo" / "hangs_once"
    (model / "1").mkdir(parents=True)
    (model / "config.yaml").write_text(textwrap.dedent(f"""\
        backend: python
        max_batch_size: 0
        input: [{{name: X, data_type: TYPE_FP32, dims: [1]}}]
        output: [{{name: X, data_type: TYPE_FP32, dims: [1]}}]
        parameters: {{marker: "{marker}"}}
        """))
    (model / "1" / "model.py").write_text(textwrap.dedent("""\
        import pathlib, time
        class Model:
            def load(self, ctx):
                marker = pathlib.Path(ctx.config.parameters["marker"])
                if not marker.exists():
                    marker.write_text("hung")
                    time.sleep(120)
            def execute(self, requests):
                return [None for _ in requests]
        """))
    act = LocalActuator("p", LocalConfig(model_repository=str(tmp_path / "repo"), balancer_admin=balancer.endpoints.admin,
                                         start_timeout=4, restart_backoff=0.2))
    await act.start()
    try:
        await act.scale(1)
        await until(lambda: act.failed_starts == 1, timeout=20, what="the hung replica to be killed and counted")
        await until(lambda: act.counts() == (1, 1), timeout=30, what="a healthy replica after the failed one")
        assert len(act.replicas) == 1
    finally:
        await act.close(stop_replicas=True)
