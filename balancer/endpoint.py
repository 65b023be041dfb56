"""Endpoints and the immutable per-pool snapshot that pickers choose from.

An :class:`Endpoint` is long lived (one per upstream address in a pool). Each of its fields has
one writer: the pool (membership, configured weight, health, drain, the upstream connections),
the data plane (``outstanding``), the pool's accounting (``requests``, ``failures``), the outlier
detector (``outlier``) and the picker (``load``, its private estimator). The :class:`Snapshot` is
rebuilt by the pool whenever membership, health, drain, ejection or slow-start weights change; it
holds frozen ``(endpoint, weight)`` entries, the weight being the one in force when it was built
(slow start applied), and pickers never see anything else.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from modelyard.balancer.retry import RttEstimator

if TYPE_CHECKING:
    from modelyard.balancer.rest.upstream import HttpUpstream
    from modelyard.balancer.upstream import Upstream

#: what a discovery source says of one endpoint: (gRPC address, weight) or (gRPC address, weight, HTTP address)
Member = tuple[str, float] | tuple[str, float, str | None]


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


@dataclass(slots=True)
class OutlierState:
    """Passive outlier detection's state of one endpoint (written by the OutlierDetector only)."""

    consecutive_failures: int = 0
    times_ejected: int = 0
    #: ejected while the clock reads less than this
    ejected_until: float = 0.0


@dataclass(eq=False, slots=True)
class Endpoint:
    """One upstream address in one pool."""

    address: str
    #: configured weight (from its discovery source)
    weight: float = 1.0
    #: the same replica's HTTP (REST) address, when its source gave one: the REST listener routes there
    http: str | None = None
    source: str = "static"
    added_at: float = 0.0
    health: Health = Health.UNKNOWN
    draining: bool = False
    #: the data plane's connections to it (None in a control process, or once closed)
    upstream: Upstream | None = None
    #: the REST relay's keep-alive HTTP/1.1 connections to ``http`` (None without a REST listener or address)
    http_upstream: HttpUpstream | None = None
    #: attempts in flight (the data plane)
    outstanding: int = 0
    #: finished attempts and failed ones (the pool's accounting, for /endpoints)
    requests: int = 0
    failures: int = 0
    outlier: OutlierState = field(default_factory=OutlierState)
    #: smoothed latency of its answers (the pool's accounting): its per-try timeout
    rtt: RttEstimator = field(default_factory=RttEstimator)
    #: the picker's private per-endpoint state (e.g. the Peak-EWMA estimator), attached on first use
    load: Any = None

    def __repr__(self) -> str:
        return f"Endpoint({self.address!r})"

    def is_ejected(self, now: float) -> bool:
        return self.outlier.ejected_until > now


class Entry(NamedTuple):
    """An endpoint as a snapshot offers it: with the weight in force when the snapshot was built."""

    endpoint: Endpoint
    weight: float


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The endpoints a picker may choose from, frozen at build time.

    ``panic`` says the pool had too few healthy endpoints and the snapshot holds
    every non-draining endpoint instead (Envoy's panic routing).
    """

    pool: str
    entries: tuple[Entry, ...]
    panic: bool = False
    version: int = 0
    endpoints: tuple[Endpoint, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "endpoints", tuple(e.endpoint for e in self.entries))

    @classmethod
    def of(cls, pool: str, endpoints: tuple[Endpoint, ...], **kw: Any) -> Snapshot:
        """A snapshot offering ``endpoints`` at their configured weights."""
        return cls(pool, tuple(Entry(e, e.weight) for e in endpoints), **kw)

    def __len__(self) -> int:
        return len(self.entries)

    def weight(self, endpoint: Endpoint) -> float | None:
        """The weight ``endpoint`` has in this snapshot (None when it is not in it)."""
        for e in self.entries:
            if e.endpoint is endpoint:
                return e.weight
        return None


class NoEndpoint(Exception):
    """No endpoint can be picked; carries the pool name for the UNAVAILABLE message."""

    def __init__(self, pool: str) -> None:
        super().__init__(f"no healthy endpoint in pool '{pool}'")
        self.pool = pool
