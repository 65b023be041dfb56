"""Endpoints and the immutable per-pool snapshot that pickers choose from.

An :class:`Endpoint` is long lived (one per upstream address in a pool) and carries
the mutable per-request load counters that load-aware pickers read; the
:class:`Snapshot` is rebuilt by the pool whenever membership, health, drain,
ejection or slow-start weights change, and pickers never see anything else.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Outcome(enum.Enum):
    """How one upstream attempt ended, as far as load balancing cares."""

    SUCCESS = "success"
    #: the upstream answered with an error that says nothing about its health (e.g. NOT_FOUND)
    APP_ERROR = "app_error"
    #: connection failure, UNAVAILABLE, INTERNAL...: counts towards outlier ejection
    FAILURE = "failure"


class Health(enum.Enum):
    """Active health-check state of an endpoint."""

    UNKNOWN = "unknown"  # not checked yet: routable
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


@dataclass(eq=False)
class Endpoint:
    """One upstream address in one pool, with its load counters.

    ``outstanding`` is maintained by the data plane; ``load`` is picker-private
    state (e.g. the Peak-EWMA estimator) attached by the picker on first use.
    """

    address: str
    weight: float = 1.0
    source: str = "static"
    added_at: float = 0.0
    health: Health = Health.UNKNOWN
    draining: bool = False
    ejected_until: float = 0.0
    times_ejected: int = 0
    outstanding: int = 0
    #: weight after slow start; what weighted pickers use
    effective_weight: float = 1.0
    load: object | None = None
    #: per-endpoint counters surfaced by /endpoints and /metrics
    requests: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    extra: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Endpoint({self.address!r})"

    def is_ejected(self, now: float) -> bool:
        return self.ejected_until > now


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The endpoints a picker may choose from, frozen at build time.

    ``panic`` says the pool had too few healthy endpoints and the snapshot holds
    every non-draining endpoint instead (Envoy's panic routing).
    """

    pool: str
    endpoints: tuple[Endpoint, ...]
    panic: bool = False
    version: int = 0

    def __len__(self) -> int:
        return len(self.endpoints)


class NoEndpoint(Exception):
    """No endpoint can be picked; carries the pool name for the UNAVAILABLE message."""

    def __init__(self, pool: str) -> None:
        super().__init__(f"no healthy endpoint in pool '{pool}'")
        self.pool = pool
