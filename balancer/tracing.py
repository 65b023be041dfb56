"""The balancer's spans (tracing on only): one SERVER span per proxied call, a ``pick`` span per
attempt, and the ``traceparent`` that makes the call's span the parent of the replica's spans.

A call that arrives with a ``traceparent`` joins its trace; one without starts a trace. With tracing
off the data planes forward the client's ``traceparent`` unchanged and never create a :class:`CallTrace`.
"""

from __future__ import annotations

import time
from typing import Any

from modelyard import tracing


class CallTrace:
    """The spans of one proxied call."""

    __slots__ = ("span", "t", "traceparent")

    def __init__(self, t: tracing.Tracing, name: str, parent: bytes | None, attributes: dict[str, Any]) -> None:
        self.t = t
        self.span = t.start(name, parent, tracing.SERVER, attributes=attributes)
        #: what the attempts send upstream: this call's span as the parent
        self.traceparent = t.traceparent(self.span).encode()

    def picked(self, started_ns: int, pool: str, picker: str, endpoint: str, attempt: int) -> None:
        """A ``pick`` span from ``started_ns`` (perf_counter) to now: which endpoint, for which attempt."""
        self.t.record("pick", self.span, started_ns, time.perf_counter_ns(),
                      {"modelyard.pool": pool, "modelyard.picker": picker, "modelyard.endpoint": endpoint,
                       "modelyard.attempt": attempt})

    def error(self, message: str) -> None:
        self.t.error(self.span, message)

    def end(self, **attributes: Any) -> None:
        for k, v in attributes.items():
            if v is not None:
                self.span.set_attribute(k, v)
        self.span.end()


def start_call(name: str, parent: bytes | None, **attributes: Any) -> CallTrace | None:
    """A :class:`CallTrace` when tracing is on, else None (the only cost with tracing off)."""
    t = tracing.ACTIVE
    return None if t is None else CallTrace(t, name, parent, attributes)
