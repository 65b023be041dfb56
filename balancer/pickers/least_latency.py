"""Least expected latency: P2C on each endpoint's measured latency-versus-load (the default policy)."""

from __future__ import annotations

from modelyard.balancer.load import LatencyModel
from modelyard.balancer.pickers.latency_base import LatencyPicker


class LeastLatency(LatencyPicker):
    """The cheapest of three (power of d choices) by the expected latency of one more request:
    ``base * (1 + r * outstanding) / weight``.

    ``base`` and ``r`` are learned per endpoint (see :class:`~modelyard.balancer.load.LatencyModel`):
    it starts as Peak-EWMA (``r = 1``); an endpoint whose latency measurably does not grow with its
    requests in flight keeps its own latency however many are in flight (so bursts do not push picks
    to a slow endpoint), and one whose latency does grow is charged what it grows by.

    Options (defaults): ``tau`` = 10.0 s, how fast the past is forgotten; ``rtt_prior`` = 0.005 s, a new
    endpoint's latency; ``failure_penalty`` = 0.5 s, the latency a failed attempt counts as (a fast
    failure must not attract traffic); ``min_weight`` = 0.02, the least share one sample has in the
    slope fit (the fit spans at most ~50 samples); ``floor`` = 0.05, the least ``r`` (a tie-break
    towards fewer requests in flight); ``choices`` = 3, endpoints compared per pick.
    """

    name = "least_latency"
    #: three, not two: with P2C a pair holding a bad endpoint sends its pick to the other endpoint of
    #: the pair whatever its load, so a third of the picks among the good endpoints of a 3-endpoint
    #: pool ignore their load (measured: CPU-bound replicas' p99 1.29x the healthy pool's with P2C)
    choices = 3

    def __init__(self, min_weight: float = 0.02, floor: float = 0.05, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        if not 0.0 < min_weight <= 1.0 or floor < 0:
            raise ValueError("min_weight must be in (0, 1], floor >= 0")
        self.min_weight, self.floor = min_weight, floor

    load_type = LatencyModel

    def new_load(self, now: float) -> LatencyModel:
        return LatencyModel(now, self.rtt_prior, self.tau, self.min_weight, self.floor)

    def learn(self, load: LatencyModel, now: float, inflight: int, latency: float) -> None:
        load.observe(now, inflight, latency)
