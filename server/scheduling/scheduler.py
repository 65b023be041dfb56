"""Schedulers decide when and where requests run.

:class:`DirectScheduler` runs each request alone on the next idle instance
(Triton's default scheduler). The dynamic batcher lives in ``batcher.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from modelyard import tracing
from modelyard.server.errors import DeadlineExceeded
from modelyard.server.execution.instances import Instance, InstancePool
from modelyard.server.execution.runtimes.base import Result
from modelyard.server.tracing import current_span, record_execution
from modelyard.server.types import InferRequest, InferResponse

#: called once per executed batch: (batch size, queue ns of each request, compute ns, instance name)
BatchObserver = Callable[[int, list[int], int, str], None]


async def wait_for_wake(wake: asyncio.Event, wake_at: float | None, clock: Callable[[], float]) -> None:
    """A dispatcher's pause: until ``wake`` is set or the ``clock`` reaches ``wake_at`` (None: only ``wake``).
    Already due: still let the loop run other work once before planning again."""
    if wake_at is None:
        await wake.wait()
        return
    timeout = wake_at - clock()
    if timeout > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), timeout)
    else:
        await asyncio.sleep(0)


class Scheduler:
    """Interface: ``infer`` one request, ``stream`` a decoupled request, ``close``."""

    def __init__(self, pool: InstancePool, observer: BatchObserver | None = None) -> None:
        self.pool = pool
        self.observer = observer

    async def infer(self, request: InferRequest) -> InferResponse:
        raise NotImplementedError

    async def stream(self, request: InferRequest) -> AsyncIterator[InferResponse]:
        inst = await self._acquire(request)
        try:
            async for resp in inst.stream(request):
                yield resp
        finally:
            self.pool.release(inst)

    def queue_depth(self) -> int:
        return 0

    async def _acquire(self, request: InferRequest):  # type: ignore[no-untyped-def]
        timeout = None
        if request.deadline is not None:
            timeout = request.deadline - time.monotonic()
            if timeout <= 0:
                raise DeadlineExceeded("request deadline passed before it reached an instance")
        try:
            return await self.pool.acquire(timeout)
        except TimeoutError:
            raise DeadlineExceeded("request deadline passed while waiting for a free model instance") from None

    async def close(self) -> None:
        """Stop accepting and fail anything still queued."""


class DirectScheduler(Scheduler):
    """One request per execution, queued on the instance with the fewest outstanding jobs.

    A request with a deadline that is still queued when the deadline passes is answered
    DEADLINE_EXCEEDED then (a timer), not when the instance gets to it; it is never computed.
    """

    async def infer(self, request: InferRequest) -> InferResponse:
        deadline = request.deadline
        if deadline is not None and deadline <= time.monotonic():
            raise DeadlineExceeded("request deadline passed before it reached an instance")
        inst = min(self.pool.instances, key=lambda i: i.outstanding)
        t0 = time.perf_counter_ns()
        if deadline is None:
            results, compute_ns = await inst.call(_run_one, inst, request)
        else:
            started: list[bool] = []
            job = inst.call(_run_one, inst, request, started)
            expired: list[bool] = []
            timer = asyncio.get_running_loop().call_later(max(0.0, deadline - time.monotonic()),
                                                          _expire, job, started, expired)
            try:
                results, compute_ns = await job
            except asyncio.CancelledError:
                if expired:
                    raise DeadlineExceeded("request deadline passed while queued for a model instance") from None
                raise
            finally:
                timer.cancel()
        if self.observer is not None:
            self.observer(1, [max(0, time.perf_counter_ns() - t0 - compute_ns)], compute_ns, inst.name)
        if tracing.ACTIVE is not None:
            now = time.perf_counter_ns()
            record_execution(current_span(), t0, max(t0, now - compute_ns), now, compute_ns, 1, inst.name,
                             request.model)
        result = results[0]
        if isinstance(result, BaseException):
            raise result
        return result


def _run_one(inst: Instance, request: InferRequest, started: list[bool] | None = None) -> tuple[list[Result], int]:
    """Instance-thread side: a request whose deadline passed while queued is never computed."""
    if started is not None:
        started.append(True)
    if request.deadline is not None and request.deadline <= time.monotonic():
        return [DeadlineExceeded("request deadline passed while queued for a model instance")], 0
    return inst._execute([request])


def _expire(job: asyncio.Future[Any], started: list[bool], expired: list[bool]) -> None:
    """The deadline timer: a job still queued is cancelled (the instance skips it); a started one runs on."""
    if not started and not job.done():
        expired.append(True)
        job.cancel()
