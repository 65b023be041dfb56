"""Retry policy: the retry budget (linkerd style) and jittered exponential backoff.

A retry is allowed only while retries in the last ``ttl`` seconds stay below
``ratio * requests + min_retries_per_second * ttl``, so retries add at most a
bounded share of load even when every request fails.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

from modelyard.clock import MONOTONIC, Clock
from modelyard.config import Check


@dataclass
class RetryConfig:
    """Retry knobs (our defaults)."""

    #: attempts including the first; 1 disables retries
    max_attempts: int = 3
    #: retries may add at most this share of the requests seen in the window
    budget_ratio: float = 0.2
    #: ... plus this many retries per second whatever the traffic (the floor)
    min_retries_per_second: float = 10.0
    #: window the budget counts over, seconds
    budget_ttl: float = 10.0
    #: first backoff, seconds; doubles per retry, full jitter
    base_backoff: float = 0.005
    #: backoff cap, seconds
    max_backoff: float = 0.1

    def validate(self, check: Check) -> None:
        check(self.max_attempts >= 1, "max_attempts", "must be >= 1")
        check(self.budget_ratio >= 0, "budget_ratio", "must be >= 0")
        check(self.min_retries_per_second >= 0, "min_retries_per_second", "must be >= 0")
        check(self.budget_ttl > 0, "budget_ttl", "must be > 0")
        check(0 <= self.base_backoff <= self.max_backoff, "base_backoff", "must be within 0..max_backoff")


class RetryBudget:
    """Sliding-window deposit/withdraw counter with a floor; clock injected."""

    def __init__(self, config: RetryConfig, clock: Clock = MONOTONIC, buckets: int = 10) -> None:
        self.config = config
        self.clock = clock
        self._width = config.budget_ttl / buckets
        self._buckets: deque[list[float]] = deque()  # [start, requests, retries]
        self._requests = 0
        self._retries = 0
        self.exhausted = 0

    def _roll(self) -> list[float]:
        now = self.clock.now()
        b = self._buckets
        horizon = now - self.config.budget_ttl
        while b and b[0][0] + self._width <= horizon:
            old = b.popleft()
            self._requests -= int(old[1])
            self._retries -= int(old[2])
        if not b or now >= b[-1][0] + self._width:
            b.append([now, 0, 0])
        return b[-1]

    def deposit(self) -> None:
        """Count one original request."""
        self._roll()[1] += 1
        self._requests += 1

    def try_withdraw(self) -> bool:
        """Take one retry from the budget; False (and counted) when exhausted."""
        cur = self._roll()
        cfg = self.config
        allowed = cfg.budget_ratio * self._requests + cfg.min_retries_per_second * cfg.budget_ttl
        if self._retries + 1 > allowed:
            self.exhausted += 1
            return False
        cur[2] += 1
        self._retries += 1
        return True


def backoff(attempt: int, config: RetryConfig, rng: random.Random) -> float:
    """Full-jitter backoff before retry number ``attempt`` (1 = first retry)."""
    cap = min(config.max_backoff, config.base_backoff * (2 ** (attempt - 1)))
    return rng.uniform(0.0, cap)
