"""Load measurement, separate from selection (tower's ``load`` vs ``p2c``).

:class:`PeakEwma` is the latency estimator of one endpoint. A sample slower than
the estimate replaces it at once (peak sensitive); a faster one is blended in with
weight ``1 - exp(-dt/tau)``, where ``dt`` is the time since the previous update, so
the estimate forgets a peak over about ``tau`` seconds of traffic. Read at time
``now`` the estimate also decays towards zero with the idle time, so an endpoint
that was penalised and then left alone is eventually probed again.
"""

from __future__ import annotations

import math


class PeakEwma:
    """Peak-sensitive exponentially weighted RTT estimate (seconds) of one endpoint."""

    __slots__ = ("rtt", "stamp", "tau")

    def __init__(self, now: float, rtt_prior: float, tau: float) -> None:
        self.rtt = rtt_prior
        self.stamp = now
        self.tau = tau

    def observe(self, now: float, rtt: float) -> None:
        """Fold one latency sample taken at ``now`` into the estimate."""
        dt = now - self.stamp
        if dt < 0.0:
            dt = 0.0
        decayed = self.rtt * math.exp(-dt / self.tau)
        if rtt >= decayed:
            self.rtt = rtt
        else:
            w = math.exp(-dt / self.tau) if dt > 0.0 else 1.0
            # weight kept by the old estimate shrinks with the time since it was last updated
            self.rtt = self.rtt * w + rtt * (1.0 - w)
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
