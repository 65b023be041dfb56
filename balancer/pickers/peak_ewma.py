"""Peak EWMA (Finagle / linkerd / tower): P2C on ``rtt_estimate * (outstanding + 1)``."""

from __future__ import annotations

from modelyard.balancer.load import PeakEwma as PeakEwmaLoad
from modelyard.balancer.pickers.latency_base import LatencyPicker


class PeakEwma(LatencyPicker):
    """Latency-aware P2C.

    Options (defaults): ``tau`` = 10.0 s decay time constant; ``rtt_prior`` = 0.005 s, the estimate a new
    endpoint starts from; ``failure_penalty`` = 0.5 s, the latency recorded for a failed attempt so that
    an endpoint failing fast looks slow, not fast; ``min_weight`` = 0.1, the least weight one sample gets
    in the estimate (see :mod:`modelyard.balancer.load`; 0 gives the purely time-based tower/Finagle blend).
    """

    name = "peak_ewma"

    def __init__(self, min_weight: float = 0.1, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        if not 0.0 <= min_weight <= 1.0:
            raise ValueError("min_weight must be in [0, 1]")
        self.min_weight = min_weight

    load_type = PeakEwmaLoad

    def new_load(self, now: float) -> PeakEwmaLoad:
        return PeakEwmaLoad(now, self.rtt_prior, self.tau, self.min_weight)

    def learn(self, load: PeakEwmaLoad, now: float, inflight: int, latency: float) -> None:
        load.observe(now, latency)
