"""Server-wide load shedding: answer RESOURCE_EXHAUSTED at once instead of letting latency grow.

Two bounds (``overload`` in the server's settings, docs/security.md):

- ``max_inflight``: inference requests inside the server at once (every protocol, each stream
  message); one more is refused before it is validated or queued, with a retry-after hint;
- ``max_queue_ms``: a request still waiting for a model instance after this long is refused
  instead of computed (it would only be computed late, for a client that may have given up). It
  rides on the request's deadline: the earlier of the client's own and the bound applies, and when
  the bound is what fired, the answer is RESOURCE_EXHAUSTED rather than DEADLINE_EXCEEDED.

The per-model bounds (``max_concurrency``, the batcher's ``max_queue_size``) stay in each model's config.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from modelyard.server.errors import Overloaded

if TYPE_CHECKING:
    from modelyard.server.config import OverloadConfig
    from modelyard.server.metrics import ServerMetrics
    from modelyard.server.types import InferRequest


class Admission:
    """The server's in-flight count and its bounds; one per server, shared by every model version."""

    __slots__ = ("_shed_inflight", "_shed_queue", "inflight", "limit", "queue_s", "retry_after_ms")

    def __init__(self, limit: int = 0, max_queue_ms: float = 0.0, retry_after_ms: int = 100,
                 metrics: ServerMetrics | None = None) -> None:
        self.inflight = 0
        self.limit = limit
        self.queue_s = max_queue_ms / 1000.0
        self.retry_after_ms = retry_after_ms
        refused = metrics.refused if metrics is not None else None
        self._shed_inflight = refused.labels("shed_inflight") if refused is not None else None
        self._shed_queue = refused.labels("shed_queue") if refused is not None else None

    @classmethod
    def from_config(cls, cfg: OverloadConfig, metrics: ServerMetrics | None = None) -> Admission:
        return cls(cfg.max_inflight, cfg.max_queue_ms, cfg.retry_after_ms, metrics)

    def enter(self) -> None:
        """Count one more request in flight, or refuse it (Overloaded) when the server is full."""
        if self.limit and self.inflight >= self.limit:
            if self._shed_inflight is not None:
                self._shed_inflight.inc()
            raise Overloaded(f"the server has {self.inflight} requests in flight (overload.max_inflight "
                             f"{self.limit}); retry after {self.retry_after_ms} ms", self.retry_after_ms)
        self.inflight += 1

    def exit(self) -> None:
        self.inflight -= 1

    def bound(self, request: InferRequest) -> float | None:
        """Cap ``request.deadline`` at now + ``max_queue_ms``; the client's own deadline when the bound
        applies (restore it with :meth:`queue_shed` if the bound fires), else None."""
        if not self.queue_s:
            return None
        bound = time.monotonic() + self.queue_s
        own = request.deadline
        if own is not None and own <= bound:
            return None
        request.deadline = bound
        return own if own is not None else float("inf")

    def queue_shed(self, request: InferRequest, own: float) -> Overloaded:
        """The answer for a request whose queue bound fired (its own deadline is put back)."""
        request.deadline = None if own == float("inf") else own
        if self._shed_queue is not None:
            self._shed_queue.inc()
        return Overloaded(f"request waited more than overload.max_queue_ms ({self.queue_s * 1000:g} ms) for a "
                          f"model instance; the server is overloaded, retry after {self.retry_after_ms} ms",
                          self.retry_after_ms)
