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

    def available(self) -> bool:
        """Whether one more retry fits the budget now (does not take it)."""
        self._roll()
        cfg = self.config
        return self._retries + 1 <= cfg.budget_ratio * self._requests + cfg.min_retries_per_second * cfg.budget_ttl

    def withdraw(self) -> None:
        """Take one retry (after :meth:`available` said yes)."""
        self._roll()[2] += 1
        self._retries += 1

    def try_withdraw(self) -> bool:
        """Take one retry from the budget; False (and counted) when exhausted."""
        if not self.available():
            self.exhausted += 1
            return False
        self.withdraw()
        return True


def backoff(attempt: int, config: RetryConfig, rng: random.Random) -> float:
    """Full-jitter backoff before retry number ``attempt`` (1 = first retry)."""
    cap = min(config.max_backoff, config.base_backoff * (2 ** (attempt - 1)))
    return rng.uniform(0.0, cap)


@dataclass
class HedgeConfig:
    """Per-try timeouts from each endpoint's own latency, and hedged attempts (idempotent unary methods only).

    An attempt that has not answered within its endpoint's per-try timeout gets a twin on another
    endpoint (Envoy's ``hedge_on_per_try_timeout``, gRPC's hedging policy); the first answer wins and
    the other is cancelled. A hedge is a retry for the budget, the circuit breaker and ``max_attempts``.
    """

    enabled: bool = True
    #: per-try timeout = smoothed latency + ``factor`` x its mean deviation (TCP's retransmission timeout)
    factor: float = 4.0
    #: bounds of the per-try timeout (s)
    min_per_try: float = 0.05
    max_per_try: float = 10.0
    #: per-try timeout of an endpoint that has not answered anything yet (s)
    initial_per_try: float = 1.0

    def validate(self, check: Check) -> None:
        check(self.factor > 0, "factor", "must be > 0")
        check(0 < self.min_per_try <= self.max_per_try, "min_per_try", "must be within (0, max_per_try]")
        check(self.initial_per_try > 0, "initial_per_try", "must be > 0")


class RttEstimator:
    """Smoothed latency and mean deviation of one endpoint (RFC 6298's SRTT and RTTVAR)."""

    __slots__ = ("rttvar", "srtt")

    def __init__(self) -> None:
        self.srtt: float | None = None
        self.rttvar = 0.0

    def observe(self, seconds: float) -> None:
        if self.srtt is None:
            self.srtt, self.rttvar = seconds, seconds / 2
        else:
            self.rttvar += 0.25 * (abs(self.srtt - seconds) - self.rttvar)
            self.srtt += 0.125 * (seconds - self.srtt)

    def timeout(self, cfg: HedgeConfig) -> float:
        """This endpoint's per-try timeout."""
        if self.srtt is None:
            return cfg.initial_per_try
        return min(max(self.srtt + cfg.factor * self.rttvar, cfg.min_per_try), cfg.max_per_try)


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """Whether to send another attempt; ``counter`` is the stats counter the decision increments."""

    go: bool
    counter: str
    delay: float = 0.0


def decide_retry(kind: str, *, retryable: bool, idempotent: bool, response_started: bool, attempts: int,
                 max_attempts: int, candidates: int, now: float, deadline: float | None, backoff_delay: float,
                 retries_in_flight: int, max_retries: int, budget_available: bool,
                 pinned: bool = False) -> RetryDecision:
    """Another attempt of a call: a ``"retry"`` after a failure (with backoff) or a ``"hedge"`` after a
    per-try timeout (at once, the first attempt keeps running). ``pinned``: the call belongs to a sequence
    whose state is on its endpoint only (sequence affinity). Pure: the caller counts ``counter`` and,
    when ``go``, takes the budget."""
    if response_started:
        return RetryDecision(False, "retry_after_response")  # bytes reached the client: nothing to redo
    if not retryable:
        return RetryDecision(False, "retry_not_retryable")  # a stream, or a request too big to keep
    if pinned:
        return RetryDecision(False, "retry_pinned")  # another endpoint does not have the sequence's state
    if kind == "hedge" and not idempotent:
        return RetryDecision(False, "hedge_not_idempotent")  # the first attempt may have changed state
    if attempts >= max_attempts:
        return RetryDecision(False, "retry_attempts_exhausted")
    if candidates == 0:
        return RetryDecision(False, "retry_no_endpoint")
    delay = backoff_delay if kind == "retry" else 0.0
    if deadline is not None and now + delay >= deadline:
        return RetryDecision(False, "retry_deadline_exceeded")
    if retries_in_flight >= max_retries:
        return RetryDecision(False, "circuit_open_retries")
    if not budget_available:
        return RetryDecision(False, "retry_budget_exhausted")
    return RetryDecision(True, "retries" if kind == "retry" else "hedges", delay)
