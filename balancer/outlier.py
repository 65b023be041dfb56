"""Passive outlier detection (Envoy's consecutive-failure ejection), clock-driven and pure.

``record`` is called for every finished attempt; after ``consecutive_failures``
failures in a row an endpoint is ejected for ``base_ejection_time * times_ejected``
(capped at ``max_ejection_time``), unless that would eject more than
``max_ejection_percent`` of the pool — at least one endpoint may always be ejected,
as in Envoy. ``due`` tells the pool when the next ejection ends.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from modelyard.balancer.endpoint import Endpoint, Outcome
from modelyard.config import Check


@dataclass
class OutlierConfig:
    """Knobs of passive outlier detection (Envoy names, our defaults)."""

    enabled: bool = True
    #: failures in a row that eject an endpoint
    consecutive_failures: int = 5
    #: first ejection lasts this long; the n-th lasts n times as long
    base_ejection_time: float = 30.0
    #: cap on one ejection
    max_ejection_time: float = 300.0
    #: at most this share of the pool is ejected at once (but always at least one endpoint)
    max_ejection_percent: float = 50.0

    def validate(self, check: Check) -> None:
        check(self.consecutive_failures >= 1, "consecutive_failures", "must be >= 1")
        check(self.base_ejection_time > 0, "base_ejection_time", "must be > 0")
        check(self.max_ejection_time >= self.base_ejection_time, "max_ejection_time", "must be >= base_ejection_time")
        check(0 <= self.max_ejection_percent <= 100, "max_ejection_percent", "must be within 0..100")


class OutlierDetector:
    """Counts consecutive failures per endpoint (its ``outlier`` state) and decides ejections;
    counts every decision."""

    def __init__(self, config: OutlierConfig) -> None:
        self.config = config
        self.ejections = 0
        #: ejections that were due but refused by max_ejection_percent
        self.ejections_overflow = 0

    def record(self, endpoint: Endpoint, outcome: Outcome, now: float, pool: Collection[Endpoint]) -> bool:
        """Account one attempt; return True when ``endpoint`` was just ejected.

        ``pool`` (every endpoint of the pool) is only looked at when an ejection is due.
        """
        state = endpoint.outlier
        if outcome is not Outcome.FAILURE:
            state.consecutive_failures = 0
            return False
        state.consecutive_failures += 1
        cfg = self.config
        if not cfg.enabled or state.consecutive_failures < cfg.consecutive_failures:
            return False
        if state.ejected_until > now:
            return False
        ejected = sum(1 for e in pool if e.is_ejected(now))
        allowed = max(1, int(len(pool) * cfg.max_ejection_percent / 100.0))
        if ejected >= allowed:
            self.ejections_overflow += 1
            return False
        state.times_ejected += 1
        duration = min(cfg.base_ejection_time * state.times_ejected, cfg.max_ejection_time)
        state.ejected_until = now + duration
        state.consecutive_failures = 0
        self.ejections += 1
        return True

    @staticmethod
    def next_unejection(pool: Iterable[Endpoint], now: float) -> float | None:
        """Earliest time an ejected endpoint comes back, or None."""
        times = [e.outlier.ejected_until for e in pool if e.outlier.ejected_until > now]
        return min(times) if times else None
