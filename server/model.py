"""A loaded model version: its instances, scheduler, statistics and state."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

from modelyard.server.errors import Cancelled, ModelNotReady, Overloaded, as_modelyard_error
from modelyard.server.execution.devices import resolve_devices
from modelyard.server.execution.instances import Instance, InstancePool
from modelyard.server.execution.runtimes.base import Runtime, runtime_class
from modelyard.server.metrics import ServerMetrics
from modelyard.server.model_config import ModelConfig
from modelyard.server.scheduling.cache import ResponseCache, request_key
from modelyard.server.scheduling.scheduler import DirectScheduler, Scheduler
from modelyard.server.stats import ModelStats
from modelyard.server.types import InferRequest, InferResponse
from modelyard.server.validation import validate_request
from modelyard.server.warmup import warmup_requests

log = logging.getLogger("modelyard.server")

#: inputs (or outputs) larger than this are hashed / copied for the response cache in a worker thread
_INLINE_HASH_BYTES = 64 * 1024

# Triton's state names, as RepositoryIndex reports them.
LOADING, READY, UNLOADING, UNAVAILABLE = "LOADING", "READY", "UNLOADING", "UNAVAILABLE"


def build_scheduler(cfg: ModelConfig, pool: InstancePool, observer) -> Scheduler:  # type: ignore[no-untyped-def]
    """The scheduler a config asks for (dynamic batching when configured)."""
    if cfg.dynamic_batching is not None:
        try:
            from modelyard.server.scheduling.batcher import DynamicBatcher
        except ImportError:  # pragma: no cover - batcher not built
            return DirectScheduler(pool, observer)
        return DynamicBatcher(cfg, pool, observer)
    return DirectScheduler(pool, observer)


class ModelVersion:
    """One version of one model, from LOADING to READY to UNAVAILABLE."""

    def __init__(self, config: ModelConfig, version: str, path: Path, metrics: ServerMetrics) -> None:
        self.config = config
        self.name = config.name
        self.version = version
        self.path = path
        self.metrics = metrics
        self.stats = ModelStats()
        self.state = LOADING
        self.reason = ""
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.pool: InstancePool | None = None
        self.scheduler: Scheduler | None = None
        self._labels = (self.name, self.version)
        # Metric children resolved once: labels() costs a lock and a dict lookup per call.
        m, lb = metrics, self._labels
        self._m_ok = m.requests.labels(*lb, "OK")
        self._m_latency = m.request_latency.labels(*lb)
        self._m_inflight = m.inflight.labels(self.name)
        self._m_batch = m.batch_size.labels(*lb)
        self._m_compute = m.compute_latency.labels(*lb)
        self._m_queue = m.queue_latency.labels(*lb)
        # decoupled models answer with a stream: nothing single to cache
        self.cache = ResponseCache(config.response_cache) if config.response_cache.enable and not config.decoupled else None

    # ----------------------------------------------------------------- lifecycle
    async def load(self) -> None:
        """Create every instance (in worker threads), then warm up; READY only when all succeeded."""
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        # Importing a backend (and probing CUDA, which imports torch) takes seconds: not on the loop.
        cls = await loop.run_in_executor(None, runtime_class, self.config.backend, f"{self.path.parent}/config.yaml")
        devices = await loop.run_in_executor(None, resolve_devices, self.name, self.config.instance_group)
        instances: list[Instance] = []
        try:
            for i, device in enumerate(devices):
                if self.config.execution == "process":
                    from modelyard.server.execution.process_worker import ProcessRuntime

                    runtime: Runtime = ProcessRuntime(self.config, self.path, device)
                else:
                    runtime = cls(self.config, self.path, device)
                inst_name = f"{self.name}_v{self.version}_{i}"
                busy = self.metrics.instance_busy.labels(self.name, self.version, str(i))
                inst = Instance(inst_name, runtime, busy.inc)
                instances.append(inst)  # before load: a half-loaded instance is closed too
                await inst.call(runtime.load)
            self.pool = InstancePool(instances)
            self.scheduler = build_scheduler(self.config, self.pool, self._observe_batch)
            scheduler = self.scheduler
            self.metrics.queue_depth.labels(*self._labels).set_function(lambda: scheduler.queue_depth())
            load_s = time.perf_counter() - t0
            self.metrics.load_seconds.labels(*self._labels).set(load_s)
            t1 = time.perf_counter()
            await self._warmup()
        except BaseException as exc:
            # Nothing of a failed load may outlive it: scheduler task, threads, runtimes (GPU memory).
            if self.scheduler is not None:
                await self.scheduler.close()
            for inst in instances:
                await loop.run_in_executor(None, inst.close)
            self.pool = self.scheduler = None
            self.state = UNAVAILABLE
            self.reason = str(exc)
            raise
        warm_s = time.perf_counter() - t1
        self.metrics.warmup_seconds.labels(*self._labels).set(warm_s)
        self.state = READY
        self.metrics.model_ready.labels(*self._labels).set(1)
        log.info("model %s version %s READY (load %.3fs, warmup %.3fs, %d instance(s) on %s)",
                 self.name, self.version, load_s, warm_s, len(instances), ",".join(sorted(set(devices))))

    async def _warmup(self) -> None:
        assert self.scheduler is not None
        loop = asyncio.get_running_loop()
        for sample in self.config.model_warmup:
            # building samples may read files and generate data: not on the loop
            reqs = await loop.run_in_executor(None, warmup_requests, self.config, sample, self.path, self.version)
            for req in reqs:
                if self.config.decoupled:
                    async for _ in self.scheduler.stream(req):
                        pass
                else:
                    await self.scheduler.infer(req)

    async def unload(self, grace: float = 30.0) -> None:
        """Stop taking requests, let in-flight ones finish (up to ``grace`` s), release instances."""
        if self.state == UNAVAILABLE:
            return
        self.state = UNLOADING
        self.metrics.model_ready.labels(*self._labels).set(0)
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except TimeoutError:
            log.warning("model %s version %s: %d request(s) still in flight after %.0fs; unloading anyway",
                        self.name, self.version, self.inflight, grace)
        if self.scheduler is not None:
            await self.scheduler.close()
        if self.pool is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.pool.close)
        self.state = UNAVAILABLE
        self.reason = "unloaded"

    # ----------------------------------------------------------------- requests
    def _admit(self) -> None:
        if self.state != READY:
            raise ModelNotReady(f"model '{self.name}' version {self.version} is {self.state}")
        limit = self.config.max_concurrency
        if limit and self.inflight >= limit:
            raise Overloaded(f"model '{self.name}' has {self.inflight} requests in flight (max_concurrency {limit})")
        self.inflight += 1
        self._idle.clear()
        self._m_inflight.inc()

    def _leave(self) -> None:
        self.inflight -= 1
        self._m_inflight.dec()
        if self.inflight == 0:
            self._idle.set()

    def _finish(self, t0: int, error: BaseException | None) -> None:
        total = time.perf_counter_ns() - t0
        if error is None:
            self._m_ok.inc()
        else:
            if isinstance(error, asyncio.CancelledError | GeneratorExit):
                error = Cancelled("the client cancelled the request")
            self.metrics.requests.labels(*self._labels, as_modelyard_error(error).code.name).inc()
        self._m_latency.observe(total / 1e9)
        self.stats.request_done(error is None, total)

    async def infer(self, request: InferRequest) -> InferResponse:
        """Validate, schedule and account for one request."""
        self._admit()
        t0 = time.perf_counter_ns()
        error: BaseException | None = None
        try:
            validate_request(self.config, request)
            response = await self._compute(request)
            return self._shape_response(request, response)
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._finish(t0, error)
            self._leave()

    def _compute(self, request: InferRequest) -> Awaitable[InferResponse]:
        """The scheduler's answer, through the response cache when the model enables it
        (a plain function: no extra coroutine layer on the uncached hot path)."""
        assert self.scheduler is not None
        return self.scheduler.infer(request) if self.cache is None else self._cached_infer(request)

    async def _cached_infer(self, request: InferRequest) -> InferResponse:
        assert self.cache is not None and self.scheduler is not None
        t0 = time.perf_counter_ns()
        big = sum(a.nbytes for a in request.inputs.values()) > _INLINE_HASH_BYTES
        loop = asyncio.get_running_loop()
        # hashing megabytes is compute: small requests hash inline (cheaper than a thread hop)
        key = (await loop.run_in_executor(None, request_key, request, self.name, self.version) if big
               else request_key(request, self.name, self.version))
        hit = self.cache.get(key)
        if hit is not None:
            self.metrics.cache_hits.labels(*self._labels).inc()
            self.stats.cache(True, time.perf_counter_ns() - t0)
            return hit
        self.metrics.cache_misses.labels(*self._labels).inc()
        self.stats.cache(False, time.perf_counter_ns() - t0)
        # errors propagate before put: they are never cached
        response = await self.scheduler.infer(request)
        if big or sum(getattr(a, "nbytes", 0) for a in response.outputs.values()) > _INLINE_HASH_BYTES:
            await loop.run_in_executor(None, self.cache.put, key, response)
        else:
            self.cache.put(key, response)
        return response

    async def stream(self, request: InferRequest) -> AsyncIterator[InferResponse]:
        """Responses of one request; many for decoupled models."""
        self._admit()
        t0 = time.perf_counter_ns()
        error: BaseException | None = None
        try:
            validate_request(self.config, request)
            assert self.scheduler is not None
            if self.config.decoupled:
                async for resp in self.scheduler.stream(request):
                    yield self._shape_response(request, resp)
            else:
                resp = await self._compute(request)
                yield self._shape_response(request, resp)
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._finish(t0, error)
            self._leave()

    def _shape_response(self, request: InferRequest, response: InferResponse) -> InferResponse:
        if isinstance(response, BaseException):
            raise response
        # A new object: the response may be shared (response cache), so never mutate it.
        outputs = response.outputs
        if request.outputs is not None:
            outputs = {k: v for k, v in outputs.items() if k in request.outputs}
        return InferResponse(outputs=outputs, parameters=response.parameters, model=self.name,
                             version=self.version, id=request.id, final=response.final)

    def _observe_batch(self, size: int, queue_ns: list[int], compute_ns: int, instance: str) -> None:
        self._m_batch.observe(size)
        self._m_compute.observe(compute_ns / 1e9)
        q = self._m_queue
        for ns in queue_ns:
            q.observe(ns / 1e9)
            self.stats.queue.add(ns)
        self.stats.batch_done(size, 0, compute_ns, 0)
