"""The picker interface (grpc-go style) shared by every policy."""

from __future__ import annotations

import random
from collections.abc import Collection
from typing import Protocol

from modelyard.balancer.endpoint import Endpoint, Entry, NoEndpoint, Outcome, Snapshot
from modelyard.clock import MONOTONIC, Clock


class Picker(Protocol):
    """Chooses one endpoint from an immutable snapshot and learns from outcomes.

    ``pick`` must not block; it raises :class:`NoEndpoint` on an empty snapshot.
    ``on_done`` is called exactly once per picked attempt with its latency in seconds and how many other
    attempts were in flight to that endpoint when it was sent.
    ``exclude`` lets a retry or a hedge avoid endpoints already tried (ignored where nothing else is left).
    """

    name: str

    def pick(self, snapshot: Snapshot, exclude: Collection[Endpoint] = ()) -> Endpoint: ...

    def on_done(self, endpoint: Endpoint, outcome: Outcome, latency: float, inflight: int = 0) -> None: ...


class BasePicker:
    """Shared plumbing: the injected clock and RNG, options, and a no-op ``on_done``."""

    name = "base"

    def __init__(self, clock: Clock = MONOTONIC, rng: random.Random | None = None, **options: object) -> None:
        if options:
            raise TypeError(f"picker {self.name!r} has no options {sorted(options)}")
        self.clock = clock
        self.rng = rng if rng is not None else random.Random()

    def on_done(self, endpoint: Endpoint, outcome: Outcome, latency: float, inflight: int = 0) -> None:
        return None

    @staticmethod
    def candidates(snapshot: Snapshot, exclude: Collection[Endpoint]) -> tuple[Entry, ...]:
        """The snapshot's entries without those in ``exclude`` -- all of them when that would leave none."""
        entries = snapshot.entries
        if not entries:
            raise NoEndpoint(snapshot.pool)
        if exclude:
            rest = tuple(e for e in entries if e.endpoint not in exclude)
            if rest:
                return rest
        return entries
