"""The sequence batcher: stateful models, whose requests of one correlation ID must run in order.

Triton's semantics (``sequence_batching`` in config.yaml, docs/models.md "Sequences"):

* every request carries a correlation ID (``sequence_id`` parameter: a non-zero uint64 or a
  non-empty string), the first one of a sequence ``sequence_start``, the last ``sequence_end``;
* a sequence holds a *slot* from its START to its END, or until it gets no request for
  ``max_sequence_idle_microseconds``; sequences beyond the slots wait in a backlog, in order;
* at most one request of a sequence is computed at a time and they run in arrival order;
  a batch takes the next request of several sequences (one each), so sequences are batched
  together but a sequence is never batched with itself;
* ``direct``: a slot is a batch index on one instance, so a sequence always runs on the same
  instance (a model may keep state in the instance); ``oldest``: up to
  ``max_candidate_sequences`` sequences hold a slot, and a batch takes the oldest waiting
  requests of them and runs on any idle instance;
* the model gets the control inputs the config declares (START, END, READY, CORRID) as input
  tensors, and ``request.sequence`` (id, start, end and the sequence's own ``state`` dict).

:class:`SequenceTable` makes every decision and is pure (no asyncio, ``now`` is given), so the
tests drive it with a fake clock; :class:`SequenceBatcher` moves requests between the event loop
and the instances.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from modelyard.server.errors import DeadlineExceeded, InvalidInput, ModelNotReady, as_modelyard_error
from modelyard.server.execution.instances import InstancePool
from modelyard.server.model_config import ModelConfig, SequenceBatching
from modelyard.server.scheduling.batcher import QueuedJob, run_batch
from modelyard.server.scheduling.scheduler import BatchObserver, Scheduler, wait_for_wake
from modelyard.server.types import InferRequest, InferResponse, Sequence

log = logging.getLogger("modelyard.server")

#: Triton's request parameters
SEQUENCE_ID, SEQUENCE_START, SEQUENCE_END = "sequence_id", "sequence_start", "sequence_end"
#: the correlation ID of warmup requests (each one a sequence of its own)
WARMUP_ID = "modelyard-warmup"

CorrId = int | str


def correlation_id(request: InferRequest) -> CorrId | None:
    """The request's correlation ID (None for none, 0 or "")."""
    value = request.parameters.get(SEQUENCE_ID)
    if value is None or value == 0 or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidInput(f"parameter '{SEQUENCE_ID}' must be an unsigned integer or a string, got {value!r}")
    if isinstance(value, int) and not 0 < value < 2**64:
        raise InvalidInput(f"parameter '{SEQUENCE_ID}' must be an unsigned 64-bit integer, got {value}")
    return value


def _flag(request: InferRequest, key: str) -> bool:
    value = request.parameters.get(key, False)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise InvalidInput(f"parameter '{key}' must be a boolean, got {value!r}")


@dataclass(slots=True, eq=False)
class Item:
    """One queued request of a sequence; ``payload`` is whatever the batcher attaches."""

    start: bool
    end: bool
    enqueued: float
    deadline: float | None = None
    payload: Any = None
    #: set once it left the queue (batched, expired, failed or removed)
    done: bool = False
    #: the sequence it was queued in
    seq: Live | None = None
    #: arrival order across sequences (ties of ``enqueued``)
    order: int = 0


@dataclass(slots=True, eq=False)
class Live:
    """A sequence the table knows: holding a slot (``slot`` >= 0) or in the backlog (``slot`` == -1)."""

    id: CorrId
    queue: deque[Item] = field(default_factory=deque)
    slot: int = -1
    #: a request of it is being computed
    busy: bool = False
    #: when it last had a request queued or running (idle timeout counts from here)
    last: float = 0.0
    state: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class SequencePlan:
    """What to do now: ``batches`` as (instance index or -1 for any, items), ``failed`` items with
    their error, ``released`` sequences (idle timeout), and when to ask again."""

    batches: list[tuple[int, list[Item]]] = field(default_factory=list)
    failed: list[tuple[Item, Exception]] = field(default_factory=list)
    released: list[CorrId] = field(default_factory=list)
    wake_at: float | None = None


def _key(corrid: CorrId) -> tuple[type, CorrId]:
    # 1 and "1" are different sequences, as in Triton
    return (type(corrid), corrid)


class SequenceTable:
    """Slots, backlog and the batching rule of one model version; every method takes ``now``."""

    def __init__(self, model: str, sb: SequenceBatching, *, instances: int, max_batch_size: int) -> None:
        self.model = model
        self.idle = sb.idle_seconds
        self.oldest = sb.oldest is not None
        per_batch = max(1, max_batch_size)
        self.max_batch = per_batch
        if sb.oldest is not None:
            self.slots_per_instance = per_batch
            n = sb.oldest.max_candidate_sequences or per_batch * instances
            self.preferred = tuple(sorted(s for s in sb.oldest.preferred_batch_size if s <= per_batch))
            self.delay = sb.oldest.max_queue_delay_microseconds / 1e6
            self.min_utilization = 0.0
        else:
            direct = sb.direct
            self.slots_per_instance = per_batch
            n = per_batch * instances
            self.preferred = ()
            self.delay = direct.max_queue_delay_microseconds / 1e6 if direct else 0.0
            self.min_utilization = direct.minimum_slot_utilization if direct else 0.0
        self.instances = instances
        self.free_slots: set[int] = set(range(n))
        self.live: dict[tuple[type, CorrId], Live] = {}
        #: the live sequences holding a slot (at most the slot count: what plan() walks)
        self.holding: dict[tuple[type, CorrId], Live] = {}
        self.backlog: deque[Live] = deque()
        #: requests queued (not yet computed) across all sequences
        self.queued = 0
        self._arrivals = 0

    def __len__(self) -> int:
        return self.queued

    # ------------------------------------------------------------------ requests in
    def submit(self, corrid: CorrId | None, start: bool, end: bool, now: float, *,
               deadline: float | None = None, payload: Any = None) -> Item:
        """Queue a request behind the earlier ones of its sequence; InvalidInput (Triton's texts) when
        it has no correlation ID or continues a sequence that was never started (or has ended)."""
        if corrid is None:
            raise InvalidInput(f"inference request to model '{self.model}' must specify a non-zero or non-empty "
                               "correlation ID")
        key = _key(corrid)
        seq = self.live.get(key)
        if seq is None:
            if not start:
                raise InvalidInput(f"inference request for sequence {corrid} to model '{self.model}' must specify "
                                   "the START flag on the first request of the sequence")
            seq = self.live[key] = Live(corrid, last=now)
            self._assign(seq)
        self._arrivals += 1
        item = Item(start, end, now, deadline, payload, seq=seq, order=self._arrivals)
        seq.queue.append(item)
        seq.last = now
        self.queued += 1
        return item

    def remove(self, item: Item) -> None:
        """Take a queued request out (its client went away); nothing if it already left the queue."""
        if item.done:
            return
        item.done = True
        self.queued -= 1
        # left in its sequence's deque, skipped when reached: removing from the middle costs O(n)

    def _assign(self, seq: Live) -> None:
        if not self.free_slots:
            seq.slot = -1
            self.backlog.append(seq)
            return
        if self.oldest:
            seq.slot = min(self.free_slots)
        else:
            # direct: the slot on the instance with the fewest live sequences, so sequences spread
            used = [0] * self.instances
            for other in self.holding.values():
                used[other.slot // self.slots_per_instance] += 1
            seq.slot = min(self.free_slots, key=lambda s: (used[s // self.slots_per_instance], s))
        self.free_slots.discard(seq.slot)
        self.holding[_key(seq.id)] = seq

    def _release(self, seq: Live) -> None:
        key = _key(seq.id)
        if self.live.get(key) is seq:
            del self.live[key]
        if seq.slot >= 0:
            del self.holding[key]
            self.free_slots.add(seq.slot)
            seq.slot = -1
        while self.backlog and self.free_slots:
            waiting = self.backlog.popleft()
            if self.live.get(_key(waiting.id)) is waiting:
                self._assign(waiting)

    # ------------------------------------------------------------------ after a batch
    def finished(self, items: list[Item], now: float) -> list[tuple[Item, Exception]]:
        """A batch came back: its sequences may run their next request; an END releases the sequence.

        A sequence that ended with requests still queued behind the END goes on only if the next
        one is a START (a new sequence under the same ID); the others fail, as they would have
        had they arrived after the END. Returns those failures."""
        failed: list[tuple[Item, Exception]] = []
        for item in items:
            seq = item.seq
            assert seq is not None
            seq.busy = False
            seq.last = now
            if not item.end:
                continue
            while seq.queue and (seq.queue[0].done or not seq.queue[0].start):
                orphan = seq.queue.popleft()
                if not orphan.done:
                    orphan.done = True
                    self.queued -= 1
                    failed.append((orphan, InvalidInput(
                        f"inference request for sequence {seq.id} to model '{self.model}' must specify the "
                        "START flag on the first request of the sequence")))
            if not seq.queue:
                self._release(seq)
        return failed

    # ------------------------------------------------------------------ planning
    def _head(self, seq: Live, now: float, failed: list[tuple[Item, Exception]]) -> Item | None:
        """The sequence's next request (dropping removed ones and failing expired ones)."""
        q = seq.queue
        while q:
            item = q[0]
            if item.done:
                q.popleft()
                continue
            if item.deadline is not None and item.deadline <= now:
                q.popleft()
                item.done = True
                self.queued -= 1
                failed.append((item, DeadlineExceeded("request timed out in the sequence queue before it was computed")))
                continue
            return item
        return None

    def plan(self, now: float, idle_instances: list[int]) -> SequencePlan:
        """Batches to run on ``idle_instances`` (indices), failures, idle sequences released."""
        plan = SequencePlan()
        ready: list[tuple[Item, Live]] = []
        # sequences in the backlog wait for a slot: only those holding one can run or go idle; a slot freed
        # by an idle sequence goes to the backlog at once, and that sequence is looked at in this plan too
        todo = deque(self.holding.values())
        seen = {id(seq) for seq in todo}
        while todo:
            seq = todo.popleft()
            if seq.busy:
                continue
            head = self._head(seq, now, plan.failed)
            if head is not None:
                ready.append((head, seq))
                continue
            due = seq.last + self.idle
            if due > now:
                plan.wake_at = due if plan.wake_at is None else min(plan.wake_at, due)
                continue
            plan.released.append(seq.id)
            self._release(seq)
            for other in self.holding.values():
                if id(other) not in seen:
                    seen.add(id(other))
                    todo.append(other)
        if not ready or not idle_instances:
            return plan
        if self.oldest:
            self._plan_oldest(ready, now, idle_instances, plan)
        else:
            self._plan_direct(ready, now, idle_instances, plan)
        return plan

    def _take(self, chosen: list[tuple[Item, Live]]) -> list[Item]:
        items = []
        for item, seq in chosen:
            seq.queue.popleft()
            seq.busy = True
            item.done = True
            self.queued -= 1
            items.append(item)
        return items

    def _wait(self, plan: SequencePlan, at: float) -> None:
        plan.wake_at = at if plan.wake_at is None else min(plan.wake_at, at)

    def _plan_direct(self, ready: list[tuple[Item, Live]], now: float, idle: list[int], plan: SequencePlan) -> None:
        by_instance: dict[int, list[tuple[Item, Live]]] = {}
        for entry in ready:
            by_instance.setdefault(entry[1].slot // self.slots_per_instance, []).append(entry)
        for inst in idle:
            entries = by_instance.get(inst)
            if not entries:
                continue
            oldest = min(item.enqueued for item, _ in entries)
            if (self.min_utilization > 0 and len(entries) < self.min_utilization * self.slots_per_instance
                    and oldest + self.delay > now):
                self._wait(plan, oldest + self.delay)
                continue
            entries.sort(key=lambda e: e[1].slot)
            plan.batches.append((inst, self._take(entries)))

    def _plan_oldest(self, ready: list[tuple[Item, Live]], now: float, idle: list[int], plan: SequencePlan) -> None:
        ready.sort(key=lambda e: (e[0].enqueued, e[0].order))
        for inst in idle:
            if not ready:
                return
            n = min(len(ready), self.max_batch)
            if n < self.max_batch:
                # as the dynamic batcher: the largest preferred size that can be made goes at once,
                # anything else waits for the oldest request's delay
                fits = [p for p in self.preferred if p <= n]
                due = ready[0][0].enqueued + self.delay
                if fits:
                    n = fits[-1]
                elif self.delay > 0 and due > now:
                    self._wait(plan, due)
                    return
            chosen, ready = ready[:n], ready[n:]
            plan.batches.append((inst, self._take(chosen)))


# ---------------------------------------------------------------------- control tensors
_NP = {"INT32": np.int32, "FP32": np.float32, "BOOL": np.bool_, "UINT64": np.uint64, "INT64": np.int64,
       "UINT32": np.uint32}


def check_corrid_type(model: str, sb: SequenceBatching, corrid: CorrId) -> None:
    """A string correlation ID for a model whose CORRID control is an integer type: InvalidInput."""
    if not isinstance(corrid, str):
        return
    for name, control in sb.controls():
        if control.kind == "CONTROL_SEQUENCE_CORRID" and control.data_type != "BYTES":
            raise InvalidInput(f"inference request to model '{model}' must specify an integer correlation ID: its "
                               f"CORRID control '{name}' is {control.data_type}, got the string {corrid!r}")


def control_tensors(sb: SequenceBatching, corrid: CorrId, start: bool, end: bool, batched: bool) -> dict[str, np.ndarray]:
    """The control inputs a request of a sequence is given (shape [1, 1] when the model batches, else [1])."""
    out: dict[str, np.ndarray] = {}
    shape = (1, 1) if batched else (1,)
    for name, control in sb.controls():
        kind = control.kind
        if kind == "CONTROL_SEQUENCE_CORRID":
            if control.data_type == "BYTES":
                out[name] = np.full(shape, str(corrid).encode(), dtype=object)
                continue
            assert isinstance(corrid, int)  # check_corrid_type refused strings at submit
            # the uint64 ID's bits in the control's type: a 32-bit type keeps the low 32, a signed one wraps
            out[name] = np.full(shape, corrid, dtype=np.uint64).astype(_NP[control.data_type], casting="unsafe")
            continue
        flag = start if kind == "CONTROL_SEQUENCE_START" else end if kind == "CONTROL_SEQUENCE_END" else True
        out[name] = np.full(shape, control.value(flag), dtype=_NP[control.tensor_datatype()])
    return out


class SequenceBatcher(Scheduler):
    """Runs a :class:`SequenceTable`'s decisions on an :class:`InstancePool`."""

    def __init__(self, config: ModelConfig, pool: InstancePool, observer: BatchObserver | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(pool, observer)
        assert config.sequence_batching is not None
        self.config = config
        self.sb = config.sequence_batching
        self.clock = clock
        self.table = SequenceTable(config.name, self.sb, instances=len(pool.instances),
                                   max_batch_size=config.max_batch_size)
        self._index = {id(inst): i for i, inst in enumerate(pool.instances)}
        #: instances not running a batch (direct needs a given one, so the pool's queue is not used)
        self._idle: list[bool] = [True] * len(pool.instances)
        self._wake = asyncio.Event()
        self._closed = False
        self._running: set[asyncio.Task[None]] = set()
        self._task = asyncio.get_running_loop().create_task(self._dispatch_loop(), name=f"sequences-{config.name}")

    def queue_depth(self) -> int:
        return len(self.table)

    async def infer(self, request: InferRequest) -> InferResponse:
        """Queue ``request`` behind the earlier requests of its sequence (synchronously: the order in
        which callers reach here is the order a sequence's requests run in) and await its response."""
        if self._closed:
            raise ModelNotReady(f"model '{self.config.name}' is unloading")
        if self.config.max_batch_size > 0 and request.batch_size() != 1:
            raise InvalidInput(f"inference request to model '{self.config.name}' must specify batch-size 1 due to "
                               "requirements of sequence batcher")
        corrid = correlation_id(request)
        if corrid is not None:
            check_corrid_type(self.config.name, self.sb, corrid)
        start, end = _flag(request, SEQUENCE_START), _flag(request, SEQUENCE_END)
        now = self.clock()
        if request.deadline is not None and request.deadline <= now:
            raise DeadlineExceeded("request deadline passed before it was queued")
        fut: asyncio.Future[InferResponse] = asyncio.get_running_loop().create_future()
        job = QueuedJob(request, fut)
        item = self.table.submit(corrid, start, end, now, deadline=request.deadline, payload=job)
        self._wake.set()
        try:
            return await fut
        except asyncio.CancelledError:
            self.table.remove(item)
            self._wake.set()
            raise

    async def stream(self, request: InferRequest) -> AsyncIterator[InferResponse]:
        yield await self.infer(request)

    async def _dispatch_loop(self) -> None:
        table = self.table
        while True:
            self._wake.clear()
            idle = [i for i, free in enumerate(self._idle) if free]
            plan = table.plan(self.clock(), idle)
            for item, exc in plan.failed:
                self._fail(item, exc)
            for corrid in plan.released:
                log.warning("model %s: sequence %s idle for %.3fs: ended and its slot freed",
                            self.config.name, corrid, table.idle)
            for inst, items in plan.batches:
                self._start(inst, items)
            await wait_for_wake(self._wake, plan.wake_at, self.clock)

    @staticmethod
    def _fail(item: Item, exc: Exception) -> None:
        job: QueuedJob = item.payload
        if not job.future.done():
            job.future.set_exception(exc)

    def _start(self, index: int, items: list[Item]) -> None:
        self._idle[index] = False
        task = asyncio.get_running_loop().create_task(self._run(index, items))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    def _prepare(self, item: Item) -> InferRequest:
        job: QueuedJob = item.payload
        seq = item.seq
        assert seq is not None
        req = job.request
        if item.start:
            seq.state = {}
        controls = control_tensors(self.sb, seq.id, item.start, item.end, self.config.max_batch_size > 0)
        inputs = {**req.inputs, **controls} if controls else req.inputs
        req.inputs = inputs
        req.sequence = Sequence(seq.id, item.start, item.end, seq.state)
        return req

    async def _run(self, index: int, items: list[Item]) -> None:
        def release() -> None:
            self._idle[index] = True
            for failed_item, error in self.table.finished(items, self.clock()):
                self._fail(failed_item, error)
            self._wake.set()

        try:
            requests = [self._prepare(i) for i in items]
        except Exception as exc:  # never leave the instance taken or a caller waiting
            release()
            for item in items:
                self._fail(item, as_modelyard_error(exc))
            return
        # one request of each sequence: the batch's rows are its requests
        await run_batch(self.pool.instances[index], [i.payload for i in items], requests,
                        len(items), release, self.observer, self.config.name)

    async def close(self) -> None:
        """Fail what is queued, stop dispatching; batches already running finish."""
        self._closed = True
        for seq in list(self.table.live.values()):
            for item in seq.queue:
                if not item.done:
                    item.done = True
                    self._fail(item, ModelNotReady(f"model '{self.config.name}' unloaded before the request ran"))
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
