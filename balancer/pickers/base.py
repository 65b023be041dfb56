"""The picker interface (grpc-go style) shared by every policy."""

from __future__ import annotations

import random
from typing import Protocol

from modelyard.balancer.endpoint import Endpoint, NoEndpoint, Outcome, Snapshot
from modelyard.clock import MONOTONIC, Clock


class Picker(Protocol):
    """Chooses one endpoint from an immutable snapshot and learns from outcomes.

    ``pick`` must not block; it raises :class:`NoEndpoint` on an empty snapshot.
    ``on_done`` is called exactly once per picked attempt with its latency in seconds.
    ``exclude`` lets a retry avoid the endpoint that just failed (ignored if it is the only one).
    """

    name: str

    def pick(self, snapshot: Snapshot, exclude: Endpoint | None = None) -> Endpoint: ...

    def on_done(self, endpoint: Endpoint, outcome: Outcome, latency: float) -> None: ...


class BasePicker:
    """Shared plumbing: the injected clock and RNG, options, and a no-op ``on_done``."""

    name = "base"

    def __init__(self, clock: Clock = MONOTONIC, rng: random.Random | None = None, **options: object) -> None:
        if options:
            raise TypeError(f"picker {self.name!r} has no options {sorted(options)}")
        self.clock = clock
        self.rng = rng if rng is not None else random.Random()

    def on_done(self, endpoint: Endpoint, outcome: Outcome, latency: float) -> None:
        return None

    @staticmethod
    def candidates(snapshot: Snapshot, exclude: Endpoint | None) -> tuple[Endpoint, ...]:
        eps = snapshot.endpoints
        if not eps:
            raise NoEndpoint(snapshot.pool)
        if exclude is not None and len(eps) > 1 and exclude in eps:
            return tuple(e for e in eps if e is not exclude)
        return eps
