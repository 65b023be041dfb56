"""Load measurement, separate from selection (tower's ``load`` vs ``p2c``).

:class:`PeakEwma` is the latency estimator of one endpoint. A sample slower than
the estimate replaces it at once (peak sensitive); a faster one is blended in with
weight ``1 - exp(-dt/tau)``, where ``dt`` is the time since the previous update, so
the estimate forgets a peak over about ``tau`` seconds of traffic. Read at time
``now`` the estimate also decays towards zero with the idle time, so an endpoint
that was penalised and then left alone is eventually probed again.

A purely time-based blend forgets a peak only after about ``tau`` seconds whatever
the request rate, so at hundreds of requests per second one scheduling hiccup on a
healthy endpoint makes it look as slow as a genuinely slow one for seconds. Each
sample therefore also moves the estimate by at least ``min_weight`` (default 0.1:
a one-off peak is forgotten after ~20 normal samples or ``tau``, whichever is first).
An endpoint that stays slow keeps its estimate, because its own samples stay slow.
"""

from __future__ import annotations

import math


class PeakEwma:
    """Peak-sensitive exponentially weighted RTT estimate (seconds) of one endpoint."""

    __slots__ = ("min_weight", "rtt", "stamp", "tau")

    def __init__(self, now: float, rtt_prior: float, tau: float, min_weight: float = 0.0) -> None:
        self.rtt = rtt_prior
        self.stamp = now
        self.tau = tau
        self.min_weight = min_weight

    def observe(self, now: float, rtt: float) -> None:
        """Fold one latency sample taken at ``now`` into the estimate."""
        dt = now - self.stamp
        if dt < 0.0:
            dt = 0.0
        keep = math.exp(-dt / self.tau) if dt > 0.0 else 1.0
        if rtt >= self.rtt * keep:
            self.rtt = rtt
        else:
            # weight kept by the old estimate shrinks with the time since it was last updated,
            # and with every sample by at least min_weight
            new = 1.0 - keep
            if new < self.min_weight:
                new = self.min_weight
            self.rtt += (rtt - self.rtt) * new
        self.stamp = now if now > self.stamp else self.stamp

    def estimate(self, now: float) -> float:
        """RTT estimate as of ``now``, decayed over the idle time since the last sample."""
        dt = now - self.stamp
        if dt <= 0.0:
            return self.rtt
        return self.rtt * math.exp(-dt / self.tau)

    def cost(self, now: float, outstanding: int) -> float:
        """Peak-EWMA load: ``rtt * (outstanding + 1)``."""
        return self.estimate(now) * (outstanding + 1)
