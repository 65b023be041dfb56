"""Round robin: each endpoint in turn, ignoring weights and load."""

from __future__ import annotations

from collections.abc import Collection

from modelyard.balancer.endpoint import Endpoint, Snapshot
from modelyard.balancer.pickers.base import BasePicker


class RoundRobin(BasePicker):
    """Cycles through the snapshot; starts at a random offset so workers do not move in lockstep."""

    name = "round_robin"

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self._next = self.rng.randrange(1 << 30)

    def pick(self, snapshot: Snapshot, exclude: Collection[Endpoint] = ()) -> Endpoint:
        eps = self.candidates(snapshot, exclude)
        i = self._next
        self._next = i + 1
        return eps[i % len(eps)].endpoint
