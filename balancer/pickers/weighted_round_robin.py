"""Weighted round robin, smooth (nginx's algorithm): interleaves instead of bursting."""

from __future__ import annotations

from collections.abc import Collection

from modelyard.balancer.endpoint import Endpoint, Snapshot
from modelyard.balancer.pickers.base import BasePicker


class WeightedRoundRobin(BasePicker):
    """Each pick adds every endpoint's effective weight to its credit and takes the richest.

    The snapshot's weights include slow start, so a new endpoint ramps up smoothly.
    Credit is kept per snapshot version and reset when the snapshot changes.
    """

    name = "weighted_round_robin"

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self._version: tuple[int, str] | None = None
        self._credit: dict[Endpoint, float] = {}

    def pick(self, snapshot: Snapshot, exclude: Collection[Endpoint] = ()) -> Endpoint:
        eps = self.candidates(snapshot, exclude)
        key = (snapshot.version, snapshot.pool)
        if key != self._version:
            self._version = key
            self._credit = {e: 0.0 for e in snapshot.endpoints}
        credit = self._credit
        total = 0.0
        best: Endpoint | None = None
        best_credit = 0.0
        for e, weight in eps:
            w = weight if weight > 0 else 0.0
            c = credit.get(e, 0.0) + w
            credit[e] = c
            total += w
            if best is None or c > best_credit:
                best, best_credit = e, c
        assert best is not None
        credit[best] = best_credit - total
        return best
