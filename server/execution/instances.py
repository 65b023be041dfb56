"""Model instances: a runtime plus the worker thread that runs it.

The event loop puts jobs on an instance's queue and awaits a future; the
instance's own thread takes job after job without waiting for the loop, so a busy
loop never leaves an instance idle. Results come back with one
``call_soon_threadsafe`` per job. torch releases the GIL inside kernels, so
instances in threads compute in parallel.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from modelyard.server.errors import as_modelyard_error
from modelyard.server.execution.devices import resolve_devices
from modelyard.server.execution.runtimes.base import Result, Runtime, runtime_class
from modelyard.server.model_config import ModelConfig
from modelyard.server.types import InferRequest, InferResponse

_END = object()


def _settle_all(items: list[tuple[Any, asyncio.Future[Any], bool, Any]]) -> None:
    for _, fut, ok, value in items:
        if not fut.done():
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)


#: a job slower than this hands its result back at once (ns)
FLUSH_AFTER_NS = 50_000
#: never hold more than this many finished results
FLUSH_MAX_JOBS = 32


class Instance:
    """One runtime on one device, executing jobs one at a time in its own thread."""

    def __init__(self, name: str, runtime: Runtime, on_busy: Callable[[float], None] | None = None) -> None:
        self.name = name
        self.runtime = runtime
        self._on_busy = on_busy
        #: jobs queued or running (maintained on the loop; used to pick the least-loaded instance)
        self.outstanding = 0
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._submitting: list[tuple[asyncio.Future[Any], Callable[..., Any], tuple[Any, ...]]] = []
        self._thread = threading.Thread(target=self._work, name=f"modelyard-{name}", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        # Both directions are coalesced so that a busy event loop and this thread do not hand
        # the GIL back and forth once per request:
        # * the loop puts every job submitted during one loop iteration as one group (see call());
        # * results of cheap jobs go back in groups: one call_soon_threadsafe for all the jobs
        #   finished while more were waiting. A job slower than FLUSH_AFTER_NS, running out of
        #   work, or a next job expected to be slow (EWMA of job times) flushes first, so no
        #   result waits behind a slow job.
        pending: list[tuple[Any, asyncio.Future[Any], bool, Any]] = []
        jobs = self._jobs
        # Expected job time: starts "slow" so nothing is held until this instance has shown its
        # jobs are cheap; a result is only held back behind jobs expected to be cheap.
        ewma_ns = 2.0 * FLUSH_AFTER_NS
        while True:
            if pending and jobs.empty():
                self._flush(pending)
                pending = []
            group = jobs.get()
            if group is None:
                if pending:
                    self._flush(pending)
                return
            loop, batch = group
            for fut, fn, args in batch:
                if fut.cancelled():  # the caller went away while this job was queued: never compute it
                    continue
                if pending and ewma_ns > FLUSH_AFTER_NS:
                    self._flush(pending)
                    pending = []
                t0 = time.perf_counter_ns()
                try:
                    pending.append((loop, fut, True, fn(*args)))
                except BaseException as exc:
                    pending.append((loop, fut, False, exc))
                took = time.perf_counter_ns() - t0
                ewma_ns = 0.8 * ewma_ns + 0.2 * took
                if len(pending) >= FLUSH_MAX_JOBS or took > FLUSH_AFTER_NS:
                    self._flush(pending)
                    pending = []

    @staticmethod
    def _flush(pending: list[tuple[Any, asyncio.Future[Any], bool, Any]]) -> None:
        loop = pending[0][0]
        if all(item[0] is loop for item in pending):
            loop.call_soon_threadsafe(_settle_all, pending)
        else:  # jobs from several loops (tests): one wake-up per loop item
            for item in pending:
                item[0].call_soon_threadsafe(_settle_all, [item])

    def _job_done(self, _: asyncio.Future[Any]) -> None:
        self.outstanding -= 1

    def call(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Run ``fn(*args)`` in this instance's thread, after the jobs already queued."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.outstanding += 1
        fut.add_done_callback(self._job_done)
        self._submitting.append((fut, fn, args))
        if len(self._submitting) == 1:
            loop.call_soon(self._submit, loop)
        return fut

    def _submit(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hand every job submitted in this loop iteration to the thread at once (one wake-up)."""
        group, self._submitting = self._submitting, []
        self._jobs.put((loop, group))

    def _execute(self, requests: list[InferRequest]) -> tuple[list[Result], int]:
        t0 = time.perf_counter_ns()
        try:
            results = self.runtime.execute(requests)
            if len(results) != len(requests):
                raise RuntimeError(f"backend returned {len(results)} results for {len(requests)} requests")
        except BaseException as exc:  # the whole batch failed; the process goes on
            results = [as_modelyard_error(exc)] * len(requests)
        elapsed = time.perf_counter_ns() - t0
        if self._on_busy is not None:
            self._on_busy(elapsed / 1e9)
        return results, elapsed

    async def execute(self, requests: list[InferRequest]) -> tuple[list[Result], int]:
        """Results per request and the compute time in ns."""
        return await self.call(self._execute, requests)

    async def stream(self, request: InferRequest) -> AsyncIterator[InferResponse]:
        """Run a decoupled model's ``stream`` in this instance's thread, yielding responses as they come.

        Closing the iterator (client cancelled) sets the flag the model polls.
        """
        loop = asyncio.get_running_loop()
        out: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()

        def produce() -> None:
            try:
                for resp in self.runtime.stream(request, stop.is_set):
                    loop.call_soon_threadsafe(out.put_nowait, resp)
                    if stop.is_set():
                        break
            except BaseException as exc:
                loop.call_soon_threadsafe(out.put_nowait, as_modelyard_error(exc))
            finally:
                loop.call_soon_threadsafe(out.put_nowait, _END)

        fut = self.call(produce)
        try:
            while True:
                item = await out.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            await asyncio.shield(fut)

    def close(self, timeout: float = 30.0) -> None:
        """Finish the queued jobs, stop the thread, unload the runtime (call from a worker thread)."""
        self._jobs.put(None)
        self._thread.join(timeout)
        self.runtime.unload()


class InstancePool:
    """Idle instances; a request (or batch) takes one, runs, and gives it back."""

    def __init__(self, instances: list[Instance]) -> None:
        self.instances = instances
        self._free: asyncio.Queue[Instance] = asyncio.Queue()
        self._listeners: list[Callable[[], None]] = []
        for inst in instances:
            self._free.put_nowait(inst)

    def add_release_listener(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` whenever an instance becomes idle (the batcher wakes on it)."""
        self._listeners.append(fn)

    async def acquire(self, limit_s: float | None = None) -> Instance:
        """The next idle instance; TimeoutError after ``limit_s`` seconds."""
        if limit_s is None:
            return await self._free.get()
        return await asyncio.wait_for(self._free.get(), limit_s)

    def try_acquire(self) -> Instance | None:
        try:
            return self._free.get_nowait()
        except asyncio.QueueEmpty:
            return None

    def release(self, inst: Instance) -> None:
        self._free.put_nowait(inst)
        for fn in self._listeners:
            fn()

    def return_unused(self, inst: Instance) -> None:
        """Give back an instance taken with :meth:`try_acquire` but not used (no listener is told)."""
        self._free.put_nowait(inst)

    def close(self) -> None:
        for inst in self.instances:
            inst.close()



async def build_instances(config: ModelConfig, version: str, path: Path,
                          on_busy: Callable[[int], Callable[[float], None]] | None = None) -> InstancePool:
    """Create and load every instance of one model version: a runtime per device of its instance
    groups, in a worker thread or (``execution: process``) a worker process.

    Importing a backend and probing CUDA (which imports torch) take seconds, so they run off the
    loop; each runtime loads in its instance's own thread. If any instance fails, the ones already
    created are closed before the error propagates: nothing of a failed load outlives it.
    ``on_busy(i)`` gives instance ``i``'s busy-time callback (metrics).
    """
    loop = asyncio.get_running_loop()
    cls = await loop.run_in_executor(None, runtime_class, config.backend, f"{path.parent}/config.yaml")
    devices = await loop.run_in_executor(None, resolve_devices, config.name, config.instance_group)
    instances: list[Instance] = []
    try:
        for i, device in enumerate(devices):
            if config.execution == "process":
                from modelyard.server.execution.process_worker import ProcessRuntime

                runtime: Runtime = ProcessRuntime(config, path, device)
            else:
                runtime = cls(config, path, device)
            inst = Instance(f"{config.name}_v{version}_{i}", runtime, on_busy(i) if on_busy else None)
            instances.append(inst)  # before load: a half-loaded instance is closed too
            await inst.call(runtime.load)
    except BaseException:
        for inst in instances:
            await loop.run_in_executor(None, inst.close)
        raise
    return InstancePool(instances)


def devices_of(pool: InstancePool) -> list[str]:
    """The devices a pool's instances run on (for logs)."""
    return sorted({getattr(inst.runtime, "device", "?") for inst in pool.instances})
