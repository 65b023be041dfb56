"""Least connections by power of two choices on outstanding requests (Envoy LEAST_REQUEST)."""

from __future__ import annotations

from collections.abc import Collection

from modelyard.balancer.endpoint import Endpoint, Entry, Snapshot
from modelyard.balancer.pickers.base import BasePicker
from modelyard.balancer.pickers.p2c import pick_two


def _cost(e: Entry) -> float:
    # weights scale capacity: twice the weight takes twice the outstanding requests
    return (e.endpoint.outstanding + 1) / e.weight if e.weight > 0 else float("inf")


class LeastConn(BasePicker):
    """P2C on ``(outstanding + 1) / weight`` (the snapshot's weight: slow start applied)."""

    name = "least_conn"

    def pick(self, snapshot: Snapshot, exclude: Collection[Endpoint] = ()) -> Endpoint:
        return pick_two(self.candidates(snapshot, exclude), self.rng, _cost)
