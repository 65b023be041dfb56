"""The dynamic batcher: queues requests, forms batches with :class:`BatchPlanner`, runs them on idle instances.

All decisions are the planner's; this class only moves requests between the
event loop and the instances. One dispatcher task per model version wakes when
a request arrives, an instance frees up, or the planner's timer is due. A batch
is a list of requests handed to ``Runtime.execute`` as is: joining rows of
different lengths (padding) is the runtime's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from modelyard import tracing
from modelyard.server.errors import DeadlineExceeded, ModelExecutionError, ModelNotReady
from modelyard.server.execution.instances import Instance, InstancePool
from modelyard.server.model_config import DynamicBatching, ModelConfig
from modelyard.server.scheduling.planner import BatchPlanner, Pending, PlannerConfig
from modelyard.server.scheduling.scheduler import BatchObserver, Scheduler, wait_for_wake
from modelyard.server.tracing import current_span, record_execution
from modelyard.server.types import InferRequest, InferResponse

log = logging.getLogger("modelyard.server")


class QueuedJob:
    """A queued request and the future its caller awaits."""

    __slots__ = ("future", "queued_ns", "request", "span")

    def __init__(self, request: InferRequest, future: asyncio.Future[InferResponse]) -> None:
        self.request = request
        self.future = future
        self.queued_ns = time.perf_counter_ns()
        #: the request's span when tracing is on: its queue, batch and compute are recorded under it
        self.span = current_span()


class DynamicBatcher(Scheduler):
    """Triton-style dynamic batching over an :class:`InstancePool`.

    ``clock`` returns monotonic seconds (the unit of ``InferRequest.deadline``);
    tests inject their own.
    """

    def __init__(self, config: ModelConfig, pool: InstancePool, observer: BatchObserver | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(pool, observer)
        self.config = config
        self.clock = clock
        db = config.dynamic_batching or DynamicBatching()
        self.planner = BatchPlanner(PlannerConfig.from_config(config.max_batch_size, db))
        self._wake = asyncio.Event()
        self._closed = False
        self._running: set[asyncio.Task[None]] = set()
        pool.add_release_listener(self._wake.set)
        self._task = asyncio.get_running_loop().create_task(self._dispatch_loop(), name=f"batcher-{config.name}")

    def queue_depth(self) -> int:
        return len(self.planner)

    async def infer(self, request: InferRequest) -> InferResponse:
        if self._closed:
            raise ModelNotReady(f"model '{self.config.name}' is unloading")
        now = self.clock()
        if request.deadline is not None and request.deadline <= now:
            raise DeadlineExceeded("request deadline passed before it was queued")
        fut: asyncio.Future[InferResponse] = asyncio.get_running_loop().create_future()
        job = QueuedJob(request, fut)
        item = self.planner.submit(request.batch_size(), now, deadline=request.deadline,
                                   priority=request.priority, payload=job)
        self._wake.set()
        try:
            return await fut
        except asyncio.CancelledError:
            # the client went away (gRPC cancel or deadline): leave the queue so it is never computed
            self.planner.remove(item)
            raise

    async def _dispatch_loop(self) -> None:
        while True:
            self._wake.clear()
            # Take the instance before planning, so a planned batch always has somewhere to run.
            inst = self.pool.try_acquire() if len(self.planner) else None
            plan = self.planner.plan(self.clock(), can_dispatch=inst is not None)
            for item in plan.expired:
                self._fail(item, DeadlineExceeded("request timed out in the queue before it was computed"))
            if plan.batch and inst is not None:
                self._start(inst, plan.batch)
                continue
            if inst is not None:
                self.pool.return_unused(inst)
            await wait_for_wake(self._wake, plan.wake_at, self.clock)

    def _fail(self, item: Pending, exc: BaseException) -> None:
        job: QueuedJob = item.payload
        if not job.future.done():
            job.future.set_exception(exc)

    def _start(self, inst: Instance, batch: list[Pending]) -> None:
        jobs: list[QueuedJob] = [item.payload for item in batch if not item.payload.future.done()]
        if not jobs:
            self.pool.release(inst)
            return
        task = asyncio.get_running_loop().create_task(self._run(inst, jobs))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, inst: Instance, jobs: list[QueuedJob]) -> None:
        await run_batch(inst, jobs, [j.request for j in jobs], sum(j.request.batch_size() for j in jobs),
                        lambda: self.pool.release(inst), self.observer, self.config.name)

    async def close(self) -> None:
        """Fail what is queued, stop dispatching; batches already running finish."""
        self._closed = True
        for item in self.planner.drain():
            self._fail(item, ModelNotReady(f"model '{self.config.name}' unloaded before the request ran"))
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)



async def run_batch(inst: Instance, jobs: list[QueuedJob], requests: list[InferRequest], size: int,
                    release: Callable[[], None], observer: BatchObserver | None, model: str) -> None:
    """Execute ``requests`` (one per job) on ``inst`` as one batch of ``size`` rows, call ``release()`` as soon
    as the instance is free, then observe the batch, record it in the jobs' spans and settle their futures.

    The one execution path of the dynamic and the sequence batcher: an executor that fails, or a backend
    that returns the wrong number of results, fails this batch only and never leaves a caller hanging.
    """
    started = time.perf_counter_ns()
    queue_ns = [started - j.queued_ns for j in jobs]
    results: list[Any]
    try:
        results, compute_ns = await inst.execute(requests)
    except BaseException as exc:  # the executor itself failed: fail this batch only
        results, compute_ns = [exc] * len(jobs), time.perf_counter_ns() - started
    finally:
        release()
    if len(results) != len(jobs):  # a third-party backend broke the contract: fail the batch, never hang
        results = [ModelExecutionError(f"backend returned {len(results)} results for {len(jobs)} requests")] * len(jobs)
    if observer is not None:
        observer(size, queue_ns, compute_ns, inst.name)
    if tracing.ACTIVE is not None and any(j.span is not None for j in jobs):
        finished = time.perf_counter_ns()
        for j in jobs:
            record_execution(j.span, j.queued_ns, started, finished, compute_ns, size, inst.name, model)
    for job, result in zip(jobs, results, strict=True):
        if job.future.done():
            continue
        if isinstance(result, BaseException):
            job.future.set_exception(result)
        else:
            job.future.set_result(result)
