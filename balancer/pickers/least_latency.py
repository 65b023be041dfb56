"""Least expected latency: P2C on each endpoint's measured latency-versus-load (the default policy)."""

from __future__ import annotations

from collections.abc import Collection

from modelyard.balancer.endpoint import Endpoint, Entry, Outcome, Snapshot
from modelyard.balancer.load import LatencyModel
from modelyard.balancer.pickers.base import BasePicker
from modelyard.balancer.pickers.p2c import pick_two


class LeastLatency(BasePicker):
    """P2C on the expected latency of one more request: ``base * (1 + r * outstanding) / weight``.

    ``base`` and ``r`` are learned per endpoint (see :class:`~modelyard.balancer.load.LatencyModel`):
    it starts as Peak-EWMA (``r = 1``); an endpoint whose latency measurably does not grow with its
    requests in flight keeps its own latency however many are in flight (so bursts do not push picks
    to a slow endpoint), and one whose latency does grow is charged what it grows by.

    Options (defaults): ``tau`` = 10.0 s, how fast the past is forgotten; ``rtt_prior`` = 0.005 s, a new
    endpoint's latency; ``failure_penalty`` = 0.5 s, the latency a failed attempt counts as (a fast
    failure must not attract traffic); ``min_weight`` = 0.02, the least share one sample has in the
    slope fit (the fit spans at most ~50 samples); ``floor`` = 0.05, the least ``r`` (a tie-break
    towards fewer requests in flight).
    """

    name = "least_latency"

    def __init__(self, tau: float = 10.0, rtt_prior: float = 0.005, failure_penalty: float = 0.5,
                 min_weight: float = 0.02, floor: float = 0.05, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        if tau <= 0 or rtt_prior <= 0 or failure_penalty < 0:
            raise ValueError("tau and rtt_prior must be > 0, failure_penalty >= 0")
        if not 0.0 < min_weight <= 1.0 or floor < 0:
            raise ValueError("min_weight must be in (0, 1], floor >= 0")
        self.tau, self.rtt_prior, self.failure_penalty = tau, rtt_prior, failure_penalty
        self.min_weight, self.floor = min_weight, floor

    def load_of(self, e: Endpoint) -> LatencyModel:
        load = e.load
        if not isinstance(load, LatencyModel):
            load = e.load = LatencyModel(self.clock.now(), self.rtt_prior, self.tau, self.min_weight, self.floor)
        return load

    def pick(self, snapshot: Snapshot, exclude: Collection[Endpoint] = ()) -> Endpoint:
        now = self.clock.now()
        load_of = self.load_of

        def cost(e: Entry) -> float:
            w = e.weight
            ep = e.endpoint
            return load_of(ep).cost(now, ep.outstanding) / w if w > 0 else float("inf")

        return pick_two(self.candidates(snapshot, exclude), self.rng, cost)

    def on_done(self, endpoint: Endpoint, outcome: Outcome, latency: float, inflight: int = 0) -> None:
        if outcome is Outcome.FAILURE and latency < self.failure_penalty:
            latency = self.failure_penalty
        self.load_of(endpoint).observe(self.clock.now(), inflight, latency)
