"""The dynamic batcher's decisions, as a pure object: no asyncio, no clock of its own.

The :class:`BatchPlanner` holds the queued requests (one FIFO per priority level)
and answers two questions for the batcher at a time ``now`` it is given:

* which queued requests have outlived their deadline (they are failed with
  DEADLINE_EXCEEDED and never computed), and
* whether a batch should start now, which requests it holds, and if not, when
  to ask again.

It follows Triton's dynamic batcher: a batch is sent at once when it reaches
``max_batch_size`` or the largest ``preferred_batch_size`` it can make; otherwise
it waits until the oldest request has queued ``max_queue_delay``, then sends what
it has (cut to the largest preferred size that fits, if any). Sizes count rows
(dim 0 of each request), so a request of batch 4 fills four slots. Keeping this
pure is what lets the tests drive it with a fake clock.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from modelyard.server.errors import InvalidInput, Overloaded
from modelyard.server.model_config import DynamicBatching


@dataclass(slots=True)
class PlannerConfig:
    """The knobs the planner needs, in seconds (the YAML is in microseconds, as Triton's)."""

    max_batch_size: int
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay: float = 0.0
    #: 0 = unbounded
    max_queue_size: int = 0
    #: 0 = no default timeout
    default_timeout: float = 0.0
    #: 0 = one level; otherwise levels 1..N, 1 served first
    priority_levels: int = 0
    default_priority_level: int = 0

    @classmethod
    def from_config(cls, max_batch_size: int, db: DynamicBatching) -> PlannerConfig:
        """Translate the validated ``dynamic_batching`` section."""
        return cls(
            max_batch_size=max_batch_size,
            preferred_batch_sizes=tuple(sorted(s for s in db.preferred_batch_size if s <= max_batch_size)),
            max_queue_delay=db.max_queue_delay_microseconds / 1e6,
            max_queue_size=db.max_queue_size,
            default_timeout=db.default_timeout_microseconds / 1e6,
            priority_levels=db.priority_levels,
            default_priority_level=db.default_priority_level,
        )


_seq = itertools.count()


@dataclass(slots=True, eq=False)
class Pending:
    """One queued request as the planner sees it; ``payload`` is whatever the batcher attaches."""

    size: int
    enqueued: float
    deadline: float | None = None
    level: int = 0
    payload: Any = None
    seq: int = field(default_factory=lambda: next(_seq))
    #: set once the planner has handed it out (batched, expired or removed)
    done: bool = False


@dataclass(slots=True)
class Plan:
    """What to do now: run ``batch`` (maybe empty), fail ``expired``, ask again at ``wake_at``."""

    batch: list[Pending] = field(default_factory=list)
    expired: list[Pending] = field(default_factory=list)
    #: absolute time the planner wants to be asked again (None = only when something changes)
    wake_at: float | None = None


class BatchPlanner:
    """Queues per priority level and the batching rule; every method takes ``now``."""

    def __init__(self, config: PlannerConfig) -> None:
        if config.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1 for dynamic batching")
        self.config = config
        levels = max(1, config.priority_levels)
        self._queues: list[deque[Pending]] = [deque() for _ in range(levels)]
        self._count = 0
        self._rows = 0

    # ------------------------------------------------------------------ queue
    def __len__(self) -> int:
        return self._count

    @property
    def queued_rows(self) -> int:
        """Sum of the batch sizes of everything queued."""
        return self._rows

    def level_of(self, priority: int) -> int:
        """Queue index for a request priority (0 = the default level); InvalidInput outside 1..levels."""
        cfg = self.config
        if cfg.priority_levels == 0:
            return 0
        if priority == 0:
            priority = cfg.default_priority_level or 1
        if not 1 <= priority <= cfg.priority_levels:
            raise InvalidInput(f"priority {priority} outside 1..priority_levels ({cfg.priority_levels})")
        return priority - 1

    def submit(self, size: int, now: float, *, deadline: float | None = None, priority: int = 0,
               payload: Any = None) -> Pending:
        """Queue a request; Overloaded when the queue is full, InvalidInput when it can never fit."""
        cfg = self.config
        if size < 1:
            raise InvalidInput(f"batch size {size}: a request needs at least one row")
        if size > cfg.max_batch_size:
            raise InvalidInput(f"batch size {size} exceeds max_batch_size ({cfg.max_batch_size})")
        if cfg.max_queue_size and self._count >= cfg.max_queue_size:
            raise Overloaded(f"queue full ({self._count} requests queued, max_queue_size {cfg.max_queue_size})")
        if cfg.default_timeout > 0:
            own = now + cfg.default_timeout
            deadline = own if deadline is None else min(deadline, own)
        item = Pending(size=size, enqueued=now, deadline=deadline, level=self.level_of(priority), payload=payload)
        self._queues[item.level].append(item)
        self._count += 1
        self._rows += size
        return item

    def remove(self, item: Pending) -> bool:
        """Take a queued request out (its client went away); False if it already left the queue."""
        if item.done:
            return False
        try:
            self._queues[item.level].remove(item)
        except ValueError:
            return False
        self._forget(item)
        return True

    def drain(self) -> list[Pending]:
        """Empty the queue (shutdown); returns what was queued."""
        out = [item for q in self._queues for item in q]
        for q in self._queues:
            q.clear()
        for item in out:
            self._forget(item)
        return out

    def _forget(self, item: Pending) -> None:
        item.done = True
        self._count -= 1
        self._rows -= item.size

    def _in_order(self) -> Iterator[Pending]:
        for q in self._queues:
            yield from q

    # ------------------------------------------------------------------ decisions
    def expire(self, now: float) -> list[Pending]:
        """Remove and return every queued request whose deadline is at or before ``now``."""
        expired: list[Pending] = []
        for q in self._queues:
            if any(i.deadline is not None and i.deadline <= now for i in q):
                keep = deque(i for i in q if i.deadline is None or i.deadline > now)
                expired.extend(i for i in q if i.deadline is not None and i.deadline <= now)
                q.clear()
                q.extend(keep)
        for item in expired:
            self._forget(item)
        return expired

    def plan(self, now: float, *, can_dispatch: bool = True) -> Plan:
        """Expire, then decide. With ``can_dispatch`` False (no idle instance) only expiry and wake time."""
        result = Plan(expired=self.expire(now))
        if self._count == 0:
            return result
        candidates, rows = self._candidates()
        oldest = min(i.enqueued for i in candidates)
        timer = oldest + self.config.max_queue_delay
        cut = self._decide(rows, timer <= now)
        if cut and can_dispatch:
            batch = self._take(candidates, cut)
            result.batch = batch
            if self._count == 0:
                result.wake_at = self._next_deadline()
                return result
            # what is left may already form a batch of its own: ask again at once
            candidates, rows = self._candidates()
            oldest = min(i.enqueued for i in candidates)
            timer = oldest + self.config.max_queue_delay
        wake = [timer] if timer > now else [now]
        if not can_dispatch:
            # nothing can start until an instance is free; only deadlines need a timer
            wake = []
        nd = self._next_deadline()
        if nd is not None:
            wake.append(nd)
        result.wake_at = min(wake) if wake else None
        return result

    def _candidates(self) -> tuple[list[Pending], int]:
        """Requests in service order (priority, then FIFO) that fit one batch; stop at the first misfit
        so a large request is not overtaken forever by small ones behind it."""
        cap = self.config.max_batch_size
        chosen: list[Pending] = []
        rows = 0
        for item in self._in_order():
            if rows + item.size > cap:
                break
            chosen.append(item)
            rows += item.size
        return chosen, rows

    def _decide(self, rows: int, delay_passed: bool) -> int:
        """Rows to send now (0 = wait)."""
        cfg = self.config
        if rows >= cfg.max_batch_size:
            return rows
        preferred = [p for p in cfg.preferred_batch_sizes if p <= rows]
        if cfg.preferred_batch_sizes and rows >= cfg.preferred_batch_sizes[-1]:
            return preferred[-1]
        if delay_passed:
            return preferred[-1] if preferred else rows
        if self._rows > rows:
            # the queue holds more than one batch's worth: waiting cannot make this batch larger
            return rows
        return 0

    def _take(self, candidates: list[Pending], rows: int) -> list[Pending]:
        """The longest prefix of ``candidates`` with at most ``rows`` rows (at least one request)."""
        batch: list[Pending] = []
        total = 0
        for item in candidates:
            if batch and total + item.size > rows:
                break
            batch.append(item)
            total += item.size
        for item in batch:
            self._queues[item.level].remove(item)
            self._forget(item)
        return batch

    def _next_deadline(self) -> float | None:
        deadlines = [i.deadline for i in self._in_order() if i.deadline is not None]
        return min(deadlines) if deadlines else None
