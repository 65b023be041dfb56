"""Peak EWMA (Finagle / linkerd / tower): P2C on ``rtt_estimate * (outstanding + 1)``."""

from __future__ import annotations

from collections.abc import Collection

from modelyard.balancer.endpoint import Endpoint, Entry, Outcome, Snapshot
from modelyard.balancer.load import PeakEwma as PeakEwmaLoad
from modelyard.balancer.pickers.base import BasePicker
from modelyard.balancer.pickers.p2c import pick_two


class PeakEwma(BasePicker):
    """Latency-aware P2C.

    Options (defaults): ``tau`` = 10.0 s decay time constant; ``rtt_prior`` = 0.005 s,
    the estimate a new endpoint starts from; ``failure_penalty`` = 0.5 s, the latency
    recorded for a failed attempt so that an endpoint failing fast looks slow, not fast;
    ``min_weight`` = 0.1, the least weight one sample gets in the estimate (see
    :mod:`modelyard.balancer.load`; 0 gives the purely time-based tower/Finagle blend).
    """

    name = "peak_ewma"

    def __init__(
        self, tau: float = 10.0, rtt_prior: float = 0.005, failure_penalty: float = 0.5, min_weight: float = 0.1,
        **kw: object,
    ) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        if tau <= 0 or rtt_prior <= 0 or failure_penalty < 0:
            raise ValueError("tau and rtt_prior must be > 0, failure_penalty >= 0")
        if not 0.0 <= min_weight <= 1.0:
            raise ValueError("min_weight must be in [0, 1]")
        self.min_weight = min_weight
        self.tau = tau
        self.rtt_prior = rtt_prior
        self.failure_penalty = failure_penalty

    def load_of(self, e: Endpoint) -> PeakEwmaLoad:
        load = e.load
        if load is None or not isinstance(load, PeakEwmaLoad):
            load = PeakEwmaLoad(self.clock.now(), self.rtt_prior, self.tau, self.min_weight)
            e.load = load
        return load

    def pick(self, snapshot: Snapshot, exclude: Collection[Endpoint] = ()) -> Endpoint:
        now = self.clock.now()
        load_of = self.load_of

        def cost(e: Entry) -> float:
            w = e.weight
            ep = e.endpoint
            c = load_of(ep).cost(now, ep.outstanding)
            return c / w if w > 0 else float("inf")

        return pick_two(self.candidates(snapshot, exclude), self.rng, cost)

    def on_done(self, endpoint: Endpoint, outcome: Outcome, latency: float, inflight: int = 0) -> None:
        if outcome is Outcome.FAILURE and latency < self.failure_penalty:
            latency = self.failure_penalty
        self.load_of(endpoint).observe(self.clock.now(), latency)
