"""DynamicBatcher on fake runtimes: batches form while instances are busy, queue limits, deadlines, cancels."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest

from modelyard.server.errors import DeadlineExceeded, ModelExecutionError, Overloaded
from modelyard.server.execution.instances import Instance, InstancePool
from modelyard.server.execution.runtimes.base import Result, Runtime
from modelyard.server.model_config import DynamicBatching, ModelConfig
from modelyard.server.scheduling.batcher import DynamicBatcher
from modelyard.server.types import InferRequest, InferResponse


class GatedRuntime(Runtime):
    """Records each batch; blocks in execute until the test opens the gate."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, Path("."))
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.fail_ids: set[str] = set()

    def execute(self, requests: list[InferRequest]) -> list[Result]:
        self.batches.append([r.id for r in requests])
        self.entered.set()
        self.gate.wait(10)
        if any(r.id in self.fail_ids for r in requests):
            raise RuntimeError("boom")
        return [InferResponse(outputs={"Y": r.inputs["X"] * 2}) for r in requests]


def make(max_batch: int = 8, instances: int = 1, **db: object) -> tuple[DynamicBatcher, list[GatedRuntime], list]:  # type: ignore[type-arg]
    cfg = ModelConfig(name="m", max_batch_size=max_batch, dynamic_batching=DynamicBatching(**db))  # type: ignore[arg-type]
    runtimes = [GatedRuntime(cfg) for _ in range(instances)]
    pool = InstancePool([Instance(f"m_{i}", rt) for i, rt in enumerate(runtimes)])
    seen: list[tuple[int, int]] = []
    batcher = DynamicBatcher(cfg, pool, lambda size, q, c, name: seen.append((size, len(q))))
    return batcher, runtimes, seen


def req(i: int, rows: int = 1, **kw: object) -> InferRequest:
    return InferRequest(model="m", id=str(i), inputs={"X": np.full((rows, 1), i, dtype=np.float32)}, **kw)  # type: ignore[arg-type]


async def wait_until(pred, limit: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while not pred():
        if loop.time() > end:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.001)


async def test_requests_queued_behind_a_busy_instance_run_as_one_batch() -> None:
    batcher, (rt,), seen = make()
    first = asyncio.create_task(batcher.infer(req(0)))
    await wait_until(rt.entered.is_set)
    rest = [asyncio.create_task(batcher.infer(req(i))) for i in range(1, 6)]
    await wait_until(lambda: batcher.queue_depth() == 5)
    rt.gate.set()
    results = await asyncio.gather(first, *rest)
    assert [float(r.outputs["Y"][0, 0]) for r in results] == [0, 2, 4, 6, 8, 10]
    assert rt.batches == [["0"], ["1", "2", "3", "4", "5"]]
    assert seen == [(1, 1), (5, 5)]
    await batcher.close()


async def test_queue_over_max_queue_size_is_rejected_at_once() -> None:
    batcher, (rt,), _ = make(max_queue_size=2)
    first = asyncio.create_task(batcher.infer(req(0)))
    await wait_until(rt.entered.is_set)
    queued = [asyncio.create_task(batcher.infer(req(i))) for i in (1, 2)]
    await wait_until(lambda: batcher.queue_depth() == 2)
    with pytest.raises(Overloaded):
        await batcher.infer(req(3))
    rt.gate.set()
    await asyncio.gather(first, *queued)
    await batcher.close()


async def test_request_timing_out_in_queue_is_never_computed() -> None:
    batcher, (rt,), _ = make(default_timeout_microseconds=20_000)
    first = asyncio.create_task(batcher.infer(req(0)))
    await wait_until(rt.entered.is_set)
    with pytest.raises(DeadlineExceeded):
        await batcher.infer(req(1))
    rt.gate.set()
    await first
    assert rt.batches == [["0"]]
    await batcher.close()


async def test_cancelled_request_leaves_the_queue() -> None:
    batcher, (rt,), _ = make()
    first = asyncio.create_task(batcher.infer(req(0)))
    await wait_until(rt.entered.is_set)
    gone = asyncio.create_task(batcher.infer(req(1)))
    kept = asyncio.create_task(batcher.infer(req(2)))
    await wait_until(lambda: batcher.queue_depth() == 2)
    gone.cancel()
    await wait_until(lambda: batcher.queue_depth() == 1)
    rt.gate.set()
    await asyncio.gather(first, kept)
    assert rt.batches == [["0"], ["2"]]
    await batcher.close()


async def test_runtime_exception_fails_only_its_batch() -> None:
    batcher, (rt,), _ = make()
    rt.fail_ids = {"0"}
    first = asyncio.create_task(batcher.infer(req(0)))
    await wait_until(rt.entered.is_set)
    second = asyncio.create_task(batcher.infer(req(1)))
    await wait_until(lambda: batcher.queue_depth() == 1)
    rt.gate.set()
    with pytest.raises(ModelExecutionError, match="boom"):
        await first
    assert float((await second).outputs["Y"][0, 0]) == 2.0
    await batcher.close()


async def test_two_instances_run_batches_concurrently() -> None:
    batcher, rts, _ = make(instances=2)
    a = asyncio.create_task(batcher.infer(req(0)))
    await wait_until(lambda: any(rt.entered.is_set() for rt in rts))
    b = asyncio.create_task(batcher.infer(req(1)))
    await wait_until(lambda: all(rt.entered.is_set() for rt in rts))
    for rt in rts:
        rt.gate.set()
    await asyncio.gather(a, b)
    await batcher.close()


async def test_multi_row_requests_fill_rows_up_to_max_batch_size() -> None:
    batcher, (rt,), seen = make(max_batch=4)
    first = asyncio.create_task(batcher.infer(req(0)))
    await wait_until(rt.entered.is_set)
    rest = [asyncio.create_task(batcher.infer(req(i, rows=2))) for i in (1, 2, 3)]
    await wait_until(lambda: batcher.queue_depth() == 3)
    rt.gate.set()
    await asyncio.gather(first, *rest)
    assert rt.batches == [["0"], ["1", "2"], ["3"]]
    assert [s for s, _ in seen] == [1, 4, 2]
    await batcher.close()


async def test_close_fails_queued_requests() -> None:
    batcher, (rt,), _ = make()
    first = asyncio.create_task(batcher.infer(req(0)))
    await wait_until(rt.entered.is_set)
    queued = asyncio.create_task(batcher.infer(req(1)))
    await wait_until(lambda: batcher.queue_depth() == 1)
    rt.gate.set()
    await first
    closing = asyncio.create_task(batcher.close())
    await closing
    assert queued.done()
