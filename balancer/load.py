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


class LatencyModel:
    """Latency of one endpoint as a function of its requests in flight: ``L(n) = base * (1 + r * n)``.

    Peak-EWMA assumes ``r = 1``: each request in flight adds one more service time, as on a server that
    works on one request at a time. That is right for a CPU-bound server and wrong for one whose
    latency does not grow with concurrency (I/O bound, or batching accelerators): there a burst of ``n``
    in flight makes fast endpoints look ``n`` times slower than they are, and picks drift to a slow one.
    This model starts from Peak-EWMA's assumption and *measures* ``r`` per endpoint:

    - ``r`` -- from a weighted least-squares fit of latency on in-flight-at-send over recent samples
      (forgotten over ``tau`` seconds, each sample at least ``min_weight`` of the fit): slope over
      intercept, clamped to ``[floor, 4]``. It moves only when the samples spread over enough different
      ``n`` to tell load from noise; until then the prior (1) stands. ``floor`` keeps a tie-break
      towards fewer requests in flight;
    - ``base`` -- the latency with nothing else in flight: a :class:`PeakEwma` of each sample divided by
      its load factor, so a stall or a newly slow endpoint is seen at once and forgotten over ``tau``, and
      an idle endpoint's estimate decays until it is probed again.
    """

    __slots__ = ("base", "floor", "min_weight", "ratio", "stamp", "tau", "w", "wl", "wn", "wnl", "wnn")

    def __init__(self, now: float, rtt_prior: float, tau: float, min_weight: float = 0.02, floor: float = 0.05,
                 prior_ratio: float = 1.0) -> None:
        self.base = PeakEwma(now, rtt_prior, tau, min_weight=0.1)
        self.tau = tau
        self.min_weight = min_weight
        self.floor = floor
        self.ratio = prior_ratio
        self.stamp = now
        # weighted sums of the fit: weight, n, latency, n^2, n*latency
        self.w = self.wn = self.wl = self.wnn = self.wnl = 0.0

    def observe(self, now: float, inflight: int, latency: float) -> None:
        """One answered request: sent with ``inflight`` others in flight to this endpoint, took ``latency`` s."""
        dt = now - self.stamp
        keep = math.exp(-dt / self.tau) if dt > 0.0 else 1.0
        cap = (1.0 / self.min_weight - 1.0) / self.w if self.w > 0.0 else 1.0
        if keep > cap:
            keep = cap
        n = float(inflight)
        self.w = self.w * keep + 1.0
        self.wn = self.wn * keep + n
        self.wl = self.wl * keep + latency
        self.wnn = self.wnn * keep + n * n
        self.wnl = self.wnl * keep + n * latency
        if now > self.stamp:
            self.stamp = now
        w = self.w
        mean_n = self.wn / w
        var_n = self.wnn / w - mean_n * mean_n
        if var_n > 0.25:  # enough spread in n to tell its effect from noise
            mean_l = self.wl / w
            slope = (self.wnl / w - mean_n * mean_l) / var_n
            intercept = mean_l - slope * mean_n
            r = slope / intercept if intercept > 0.0 else 4.0
            self.ratio = self.floor if r < self.floor else 4.0 if r > 4.0 else r
        self.base.observe(now, latency / (1.0 + self.ratio * n))

    def estimate(self, now: float) -> float:
        """Latency with nothing else in flight, as of ``now`` (decayed over idle time)."""
        return self.base.estimate(now)

    def cost(self, now: float, outstanding: int) -> float:
        """Expected latency of one more request now: ``base * (1 + r * outstanding)``."""
        return self.base.estimate(now) * (1.0 + self.ratio * outstanding)
