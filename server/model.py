"""A loaded model version: its lifecycle (LOADING -> READY -> UNLOADING -> UNAVAILABLE), admission
and accounting of its requests, and the shape of its responses.

Instances are built by :func:`modelyard.server.execution.instances.build_instances`, batches are
formed by the scheduler, and the response cache is a wrapper around the scheduler's ``infer``
(:class:`modelyard.server.scheduling.cache.CachedInfer`); this class only puts them together.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import TracebackType

from modelyard.server.admission import Admission
from modelyard.server.errors import (
    Cancelled,
    ConfigError,
    DeadlineExceeded,
    ModelNotReady,
    Overloaded,
    as_modelyard_error,
)
from modelyard.server.execution.instances import InstancePool, build_instances, devices_of
from modelyard.server.metrics import ServerMetrics
from modelyard.server.model_config import ModelConfig
from modelyard.server.scheduling.batcher import DynamicBatcher
from modelyard.server.scheduling.cache import CachedInfer, ResponseCache
from modelyard.server.scheduling.ensemble import EnsembleScheduler, Resolve
from modelyard.server.scheduling.scheduler import BatchObserver, DirectScheduler, Scheduler
from modelyard.server.scheduling.sequence import WARMUP_ID, SequenceBatcher
from modelyard.server.stats import ModelStats
from modelyard.server.types import InferRequest, InferResponse
from modelyard.server.validation import validate_request
from modelyard.server.warmup import warmup_requests

log = logging.getLogger("modelyard.server")

# Triton's state names, as RepositoryIndex reports them.
LOADING, READY, UNLOADING, UNAVAILABLE = "LOADING", "READY", "UNLOADING", "UNAVAILABLE"


def build_scheduler(cfg: ModelConfig, pool: InstancePool | None, observer: BatchObserver,
                    resolve: Resolve | None = None) -> Scheduler:
    """The scheduler a config asks for (dynamic batching when configured; an ensemble's steps on their models)."""
    if cfg.ensemble_scheduling is not None:
        if resolve is None:
            raise ModelNotReady(f"ensemble '{cfg.name}' needs a repository to find its steps' models")
        return EnsembleScheduler(cfg, resolve, observer)
    assert pool is not None
    if cfg.dynamic_batching is not None:
        return DynamicBatcher(cfg, pool, observer)
    if cfg.sequence_batching is not None:
        return SequenceBatcher(cfg, pool, observer)
    return DirectScheduler(pool, observer)


def read_labels(cfg: ModelConfig, model_dir: Path) -> dict[str, list[str]]:
    """Each output's ``label_filename`` (in the model directory), one label per line."""
    labels: dict[str, list[str]] = {}
    for i, spec in enumerate(cfg.outputs):
        if not spec.label_filename:
            continue
        path = model_dir / spec.label_filename
        try:
            labels[spec.name] = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError([f"output[{i}].label_filename: cannot read {spec.label_filename!r} in the model "
                               f"directory ({type(exc).__name__})"], f"{cfg.name}/config.yaml") from None
    return labels


class Accounted:
    """One request's stay in a model version: admission on enter; on exit, the outcome counted
    (status metric, latency, Triton statistics) and the in-flight slot given back.

    The one accounting path of ``infer`` and ``stream``; a cancelled call (CancelledError, or a
    stream closed by its consumer) counts as CANCELLED.
    """

    __slots__ = ("admission", "mv", "t0")

    def __init__(self, mv: ModelVersion, admit: bool = True) -> None:
        self.mv = mv
        self.t0 = 0
        #: the server-wide in-flight bound; None for an ensemble's step, whose ensemble request holds the slot
        #: (counting steps too would let admitted ensemble requests starve their own steps)
        self.admission = mv.admission if admit else None

    def __enter__(self) -> Accounted:
        mv = self.mv
        if mv.state != READY:
            raise ModelNotReady(f"model '{mv.name}' version {mv.version} is {mv.state}")
        limit = mv.config.max_concurrency
        if limit and mv.inflight >= limit:
            raise Overloaded(f"model '{mv.name}' has {mv.inflight} requests in flight (max_concurrency {limit})")
        if self.admission is not None:
            self.admission.enter()
        mv.inflight += 1
        mv._idle.clear()
        mv._m_inflight.inc()
        self.t0 = time.perf_counter_ns()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        mv = self.mv
        total = time.perf_counter_ns() - self.t0
        if error is None:
            mv._m_ok.inc()
        else:
            if isinstance(error, asyncio.CancelledError | GeneratorExit):
                error = Cancelled("the client cancelled the request")
            mv.metrics.requests.labels(*mv._labels, as_modelyard_error(error).code.name).inc()
        mv._m_latency.observe(total / 1e9)
        mv.stats.request_done(error is None, total)
        if self.admission is not None:
            self.admission.exit()
        mv.inflight -= 1
        mv._m_inflight.dec()
        if mv.inflight == 0:
            mv._idle.set()


class ModelVersion:
    """One version of one model, from LOADING to READY to UNAVAILABLE."""

    def __init__(self, config: ModelConfig, version: str, path: Path, metrics: ServerMetrics,
                 admission: Admission | None = None, resolve: Resolve | None = None) -> None:
        self.config = config
        #: how an ensemble finds its steps' models when a request runs (the repository's ``get``)
        self.resolve = resolve
        #: the server-wide in-flight bound and queue-time bound (None: none)
        self.admission = admission
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
        #: output name -> its labels (``label_filename``), for the classification extension
        self.labels: dict[str, list[str]] = {}
        #: the scheduler's infer, through the response cache when the model enables it (set on load)
        self._compute: Callable[[InferRequest], Awaitable[InferResponse]] | None = None
        self._labels = (self.name, self.version)
        # Metric children resolved once: labels() costs a lock and a dict lookup per call.
        m, lb = metrics, self._labels
        self._m_ok = m.requests.labels(*lb, "OK")
        self._m_latency = m.request_latency.labels(*lb)
        self._m_inflight = m.inflight.labels(self.name)
        self._m_batch = m.batch_size.labels(*lb)
        self._m_compute = m.compute_latency.labels(*lb)
        self._m_queue = m.queue_latency.labels(*lb)

    # ----------------------------------------------------------------- lifecycle
    async def load(self) -> None:
        """Create every instance, then warm up; READY only when all succeeded."""
        t0 = time.perf_counter()
        m = self.metrics
        try:
            if any(spec.label_filename for spec in self.config.outputs):
                self.labels = await asyncio.get_running_loop().run_in_executor(
                    None, read_labels, self.config, self.path.parent)
            if self.config.ensemble_scheduling is None:  # an ensemble has no instances: its steps' models do
                self.pool = await build_instances(self.config, self.version, self.path,
                                                  lambda i: m.instance_busy.labels(self.name, self.version, str(i)).inc)
            scheduler = self.scheduler = build_scheduler(self.config, self.pool, self._observe_batch, self.resolve)
            self._compute = scheduler.infer
            cfg = self.config
            # decoupled models answer with a stream: nothing single to cache
            if cfg.response_cache.enable and not cfg.decoupled:
                self._compute = CachedInfer(ResponseCache(cfg.response_cache), scheduler.infer, self.name,
                                            self.version, self._observe_cache).infer
            m.queue_depth.labels(*self._labels).set_function(lambda: scheduler.queue_depth())
            load_s = time.perf_counter() - t0
            m.load_seconds.labels(*self._labels).set(load_s)
            t1 = time.perf_counter()
            await self._warmup()
        except BaseException as exc:
            # Nothing of a failed load may outlive it: scheduler task, threads, runtimes (GPU memory).
            await self._release()
            self.state = UNAVAILABLE
            self.reason = str(exc)
            raise
        warm_s = time.perf_counter() - t1
        m.warmup_seconds.labels(*self._labels).set(warm_s)
        self.state = READY
        m.model_ready.labels(*self._labels).set(1)
        if self.pool is None:
            log.info("ensemble %s version %s READY (load %.3fs, warmup %.3fs, steps: %s)", self.name, self.version,
                     load_s, warm_s, ", ".join(s.model_name for s in self.config.ensemble_scheduling.step))  # type: ignore[union-attr]
        else:
            log.info("model %s version %s READY (load %.3fs, warmup %.3fs, %d instance(s) on %s)", self.name,
                     self.version, load_s, warm_s, len(self.pool.instances), ",".join(devices_of(self.pool)))

    async def _warmup(self) -> None:
        assert self.scheduler is not None
        loop = asyncio.get_running_loop()
        for sample in self.config.model_warmup:
            # building samples may read files and generate data: not on the loop
            reqs = await loop.run_in_executor(None, warmup_requests, self.config, sample, self.path, self.version)
            for req in reqs:
                if self.config.sequence_batching is not None:  # each warmup request a sequence of its own
                    req.parameters.update(sequence_id=WARMUP_ID, sequence_start=True, sequence_end=True)
                if self.config.decoupled:
                    async for _ in self.scheduler.stream(req):
                        pass
                else:
                    await self.scheduler.infer(req)

    async def _release(self) -> None:
        if self.scheduler is not None:
            await self.scheduler.close()
        if self.pool is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.pool.close)
        self.pool = self.scheduler = self._compute = None

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
        await self._release()
        self.state = UNAVAILABLE
        self.reason = "unloaded"

    # ----------------------------------------------------------------- requests
    def _queue_bound(self, request: InferRequest) -> float | None:
        """Apply the server's queue-time bound (see Admission.bound); not to an ensemble, which has no queue:
        its steps are bounded each on its own model, and its deadline is what its steps receive."""
        if self.admission is None or self.config.ensemble_scheduling is not None:
            return None
        return self.admission.bound(request)

    async def infer(self, request: InferRequest, *, step: bool = False) -> InferResponse:
        """Validate, schedule and account for one request (``step``: an ensemble's step, already admitted)."""
        with Accounted(self, admit=not step):
            validate_request(self.config, request)
            assert self._compute is not None
            own = self._queue_bound(request)
            if own is None:
                response = await self._compute(request)
            else:
                try:
                    response = await self._compute(request)
                except DeadlineExceeded:
                    raise self.admission.queue_shed(request, own) from None  # type: ignore[union-attr]
            return self._shape_response(request, response)

    async def stream(self, request: InferRequest) -> AsyncIterator[InferResponse]:
        """Responses of one request; many for decoupled models."""
        with Accounted(self):
            validate_request(self.config, request)
            assert self.scheduler is not None and self._compute is not None
            own = self._queue_bound(request)
            started = False
            try:
                if self.config.decoupled:
                    async for resp in self.scheduler.stream(request):
                        started = True
                        yield self._shape_response(request, resp)
                else:
                    yield self._shape_response(request, await self._compute(request))
            except DeadlineExceeded:
                if own is None or started:
                    raise
                raise self.admission.queue_shed(request, own) from None  # type: ignore[union-attr]

    def _shape_response(self, request: InferRequest, response: InferResponse) -> InferResponse:
        if isinstance(response, BaseException):
            raise response
        # A new object: the response may be shared (response cache), so never mutate it.
        outputs = response.outputs
        if request.outputs is not None:
            outputs = {k: v for k, v in outputs.items() if k in request.outputs}
        return InferResponse(outputs=outputs, parameters=response.parameters, model=self.name,
                             version=self.version, id=request.id, final=response.final)

    # ----------------------------------------------------------------- observers
    def _observe_batch(self, size: int, queue_ns: list[int], compute_ns: int, instance: str) -> None:
        self._m_batch.observe(size)
        self._m_compute.observe(compute_ns / 1e9)
        q = self._m_queue
        for ns in queue_ns:
            q.observe(ns / 1e9)
            self.stats.queue.add(ns)
        self.stats.batch_done(size, 0, compute_ns, 0)

    def _observe_cache(self, hit: bool, ns: int) -> None:
        (self.metrics.cache_hits if hit else self.metrics.cache_misses).labels(*self._labels).inc()
        self.stats.cache(hit, ns)
