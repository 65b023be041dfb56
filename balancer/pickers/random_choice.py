"""Random: a uniform (weight-proportional) draw per request."""

from __future__ import annotations

from collections.abc import Collection

from modelyard.balancer.endpoint import Endpoint, Snapshot
from modelyard.balancer.pickers.base import BasePicker


class RandomPicker(BasePicker):
    """Draws an endpoint with probability proportional to its weight in the snapshot."""

    name = "random"

    def pick(self, snapshot: Snapshot, exclude: Collection[Endpoint] = ()) -> Endpoint:
        eps = self.candidates(snapshot, exclude)
        if len(eps) == 1:
            return eps[0].endpoint
        weights = [e.weight for e in eps]
        if all(w == weights[0] for w in weights):
            return eps[self.rng.randrange(len(eps))].endpoint
        return self.rng.choices(eps, weights=weights)[0].endpoint
