"""Outlier ejection, retry budget and backoff, pool snapshots (panic, drain, slow start)."""

from __future__ import annotations

import random

import pytest

from modelyard.balancer.config import HealthCheckConfig, PoolConfig, SlowStartConfig
from modelyard.balancer.endpoint import Endpoint, Health, Outcome
from modelyard.balancer.outlier import OutlierConfig, OutlierDetector
from modelyard.balancer.pool import Pool
from modelyard.balancer.retry import RetryBudget, RetryConfig, backoff
from modelyard.clock import FakeClock


def test_outlier_ejects_after_consecutive_failures_with_growing_time() -> None:
    det = OutlierDetector(OutlierConfig(consecutive_failures=3, base_ejection_time=10, max_ejection_time=25,
                                        max_ejection_percent=100))
    a, b = Endpoint("a:1"), Endpoint("b:1")
    pool = (a, b)
    now = 100.0
    assert not det.record(a, Outcome.FAILURE, now, pool)
    assert not det.record(a, Outcome.FAILURE, now, pool)
    assert det.record(a, Outcome.FAILURE, now, pool)
    assert a.outlier.ejected_until == 110.0 and det.ejections == 1
    assert OutlierDetector.next_unejection(pool, now) == 110.0
    now = 111.0
    for _ in range(3):
        det.record(a, Outcome.FAILURE, now, pool)
    assert a.outlier.ejected_until == now + 20  # base * times_ejected
    now = 200.0
    for _ in range(3):
        det.record(a, Outcome.FAILURE, now, pool)
    assert a.outlier.ejected_until == now + 25  # capped


def test_outlier_success_resets_the_streak_and_app_errors_do_not_count() -> None:
    det = OutlierDetector(OutlierConfig(consecutive_failures=2))
    a = Endpoint("a:1")
    det.record(a, Outcome.FAILURE, 0, (a,))
    det.record(a, Outcome.SUCCESS, 0, (a,))
    det.record(a, Outcome.FAILURE, 0, (a,))
    assert a.outlier.ejected_until == 0
    det.record(a, Outcome.APP_ERROR, 0, (a,))
    assert a.outlier.consecutive_failures == 0


def test_outlier_respects_max_ejection_percent_but_ejects_at_least_one() -> None:
    det = OutlierDetector(OutlierConfig(consecutive_failures=1, max_ejection_percent=10))
    pool = tuple(Endpoint(f"e{i}:1") for i in range(4))
    assert det.record(pool[0], Outcome.FAILURE, 0, pool)  # 10% of 4 rounds to 0, yet one is allowed
    assert not det.record(pool[1], Outcome.FAILURE, 0, pool)
    assert det.ejections_overflow == 1


def test_retry_budget_allows_ratio_plus_floor_and_refills_with_time() -> None:
    clock = FakeClock()
    budget = RetryBudget(RetryConfig(budget_ratio=0.2, min_retries_per_second=0.5, budget_ttl=10), clock)
    # floor: 0.5/s * 10 s = 5 retries with no traffic at all
    assert [budget.try_withdraw() for _ in range(6)] == [True] * 5 + [False]
    for _ in range(100):
        budget.deposit()
    # 20% of 100 requests + floor 5 = 25 in the window; 5 already used
    assert sum(budget.try_withdraw() for _ in range(30)) == 20
    assert budget.exhausted == 11
    clock.advance(11)
    assert budget.try_withdraw()  # the window has slid past the old retries


def test_backoff_is_jittered_and_capped() -> None:
    cfg = RetryConfig(base_backoff=0.01, max_backoff=0.05)
    rng = random.Random(1)
    values = [backoff(n, cfg, rng) for n in (1, 2, 3, 10) for _ in range(50)]
    assert all(0 <= v <= 0.05 for v in values)
    assert max(backoff(1, cfg, rng) for _ in range(100)) <= 0.01
    assert len(set(values)) > 100


def make_pool(clock: FakeClock, n: int = 4, **kw: object) -> Pool:
    cfg = PoolConfig(picker="round_robin", health_check=HealthCheckConfig(enabled=False), **kw)  # type: ignore[arg-type]
    pool = Pool("p", cfg, clock=clock, rng=random.Random(0))
    pool.set_source("static", [(f"127.0.10.{i}:1", 1.0) for i in range(n)])
    pool.start()
    return pool


def test_snapshot_excludes_unhealthy_draining_and_ejected() -> None:
    clock = FakeClock()
    pool = make_pool(clock, n=6)
    addrs = list(pool.endpoints)
    pool.set_health(addrs[0], Health.UNHEALTHY)
    pool.set_draining(addrs[1], True)
    pool.endpoints[addrs[2]].outlier.ejected_until = clock.now() + 5
    pool.rebuild()
    assert [e.address for e in pool.snapshot.endpoints] == addrs[3:]
    assert not pool.snapshot.panic
    clock.advance(6)
    pool.rebuild()
    assert addrs[2] in [e.address for e in pool.snapshot.endpoints]


def test_panic_mode_routes_to_all_when_too_few_are_healthy() -> None:
    clock = FakeClock()
    pool = make_pool(clock, n=4, panic_threshold=50.0)
    a = list(pool.endpoints)
    for addr in a[:3]:
        pool.set_health(addr, Health.UNHEALTHY)
    assert pool.snapshot.panic and len(pool.snapshot) == 4
    pool.set_draining(a[3], True)  # draining endpoints stay out even in panic
    assert len(pool.snapshot) == 3


def test_no_panic_threshold_leaves_the_snapshot_empty() -> None:
    clock = FakeClock()
    pool = make_pool(clock, n=2, panic_threshold=0.0)
    for addr in list(pool.endpoints):
        pool.set_health(addr, Health.UNHEALTHY)
    assert len(pool.snapshot) == 0


def test_slow_start_ramps_new_endpoints_only() -> None:
    clock = FakeClock()
    pool = make_pool(clock, n=1, slow_start=SlowStartConfig(window=10, aggression=1.0, min_weight_percent=10))
    pool.add("127.0.10.9:1")
    new = pool.endpoints["127.0.10.9:1"]
    old = pool.endpoints["127.0.10.0:1"]
    assert pool.snapshot.weight(old) == 1.0 and pool.snapshot.weight(new) == pytest.approx(0.1)
    clock.advance(5)
    pool.rebuild()
    assert pool.snapshot.weight(new) == pytest.approx(0.5)
    clock.advance(5)
    pool.rebuild()
    assert pool.snapshot.weight(new) == 1.0


def test_record_ejects_and_rebuilds_the_snapshot() -> None:
    clock = FakeClock()
    pool = make_pool(clock, n=3, outlier_detection=OutlierConfig(consecutive_failures=2, max_ejection_percent=50))
    bad = pool.endpoints["127.0.10.0:1"]
    pool.record(bad, Outcome.FAILURE, 0.001, "UNAVAILABLE")
    pool.record(bad, Outcome.FAILURE, 0.001, "UNAVAILABLE")
    assert bad not in pool.snapshot.endpoints
    assert pool.stats.events[("p", "ejections")] == 1
    assert pool.stats.requests[("p", "127.0.10.0:1", "UNAVAILABLE")] == 2


def test_sources_merge_and_removal_keeps_other_sources() -> None:
    clock = FakeClock()
    pool = make_pool(clock, n=1)
    pool.set_source("file", [("127.0.10.0:1", 1.0), ("10.1.0.0:1", 2.0)])
    assert set(pool.endpoints) == {"127.0.10.0:1", "10.1.0.0:1"}
    pool.set_source("file", [])
    assert set(pool.endpoints) == {"127.0.10.0:1"}  # still listed by "static"
    assert pool.remove("127.0.10.0:1") and not pool.endpoints


@pytest.mark.parametrize(("kind", "changes", "go", "counter"), [
    ("retry", {}, True, "retries"),
    ("hedge", {}, True, "hedges"),
    ("hedge", {"idempotent": False}, False, "hedge_not_idempotent"),
    ("retry", {"idempotent": False}, True, "retries"),  # a failed attempt was not processed: retry is safe
    ("retry", {"response_started": True}, False, "retry_after_response"),
    ("retry", {"retryable": False}, False, "retry_not_retryable"),
    ("retry", {"attempts": 3}, False, "retry_attempts_exhausted"),
    ("hedge", {"candidates": 0}, False, "retry_no_endpoint"),
    ("retry", {"deadline": 10.005}, False, "retry_deadline_exceeded"),  # the backoff would pass it
    ("hedge", {"deadline": 10.005}, True, "hedges"),                    # a hedge leaves at once
    ("retry", {"retries_in_flight": 64}, False, "circuit_open_retries"),
    ("retry", {"budget_available": False}, False, "retry_budget_exhausted"),
])
def test_the_retry_decision_names_the_counter_it_increments(kind: str, changes: dict, go: bool, counter: str) -> None:
    from modelyard.balancer.retry import decide_retry

    args = {"retryable": True, "idempotent": True, "response_started": False, "attempts": 1, "max_attempts": 3,
            "candidates": 2, "now": 10.0, "deadline": 20.0, "backoff_delay": 0.01, "retries_in_flight": 0,
            "max_retries": 64, "budget_available": True, **changes}
    d = decide_retry(kind, **args)
    assert (d.go, d.counter) == (go, counter)
    assert d.delay == (0.01 if go and kind == "retry" else 0.0)


def test_per_try_timeouts_follow_each_endpoints_own_latency() -> None:
    from modelyard.balancer.retry import HedgeConfig, RttEstimator

    cfg = HedgeConfig(factor=4.0, min_per_try=0.05, max_per_try=10.0, initial_per_try=1.0)
    fast, slow = RttEstimator(), RttEstimator()
    assert fast.timeout(cfg) == 1.0  # nothing measured yet
    for _ in range(50):
        fast.observe(0.002)
        slow.observe(0.400)
    assert fast.timeout(cfg) == 0.05               # the floor
    assert slow.timeout(cfg) == pytest.approx(0.4, rel=0.05)
    slow.observe(2.0)                              # a spike widens the deviation
    assert slow.timeout(cfg) > 1.0
