"""The scaling policy in fake time: table-driven, no clock, no I/O."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from modelyard.autoscaler.policy import Policy, PolicyConfig, Sample, slo_replicas
from modelyard.config import ConfigError, load

TICK = 1.0


def run(cfg: PolicyConfig, load_at: Any, *, until: float, replicas: int = 1, follow: bool = True,
        start: float = 0.0, **sample_kw: Any) -> tuple[Policy, list[Any]]:
    """Tick from ``start`` to ``until``; ``load_at(t)`` gives the pool's concurrency (or a dict of Sample fields).

    With ``follow`` the replicas (and ready ones) become what the policy decided, as if the
    actuator were instant.
    """
    policy = Policy(cfg)
    samples: list[Sample] = []
    decisions = []
    t = start
    while t <= until:
        value = load_at(t)
        fields = value if isinstance(value, dict) else {"concurrency": value}
        samples.append(Sample(time=t, replicas=replicas, ready=replicas, **{**sample_kw, **fields}))
        d = policy.decide(samples, t)
        decisions.append((t, d))
        if follow:
            replicas = d.desired
        t += TICK
    return policy, decisions


def last(decisions: list[Any]) -> Any:
    return decisions[-1][1]


CFG = PolicyConfig(target=10, target_utilization=0.7, stable_window=60, panic_window=6, max_replicas=20)


@pytest.mark.parametrize(("concurrency", "replicas", "expected"), [
    (21.0, 1, 3),     # 21 in flight at 7 per replica
    (7.0, 1, 1),      # exactly on target
    (7.5, 1, 1),      # +7%: inside the 10% tolerance band, no change
    (8.0, 1, 2),      # +14%: outside it
    (0.5, 4, 2),      # scale down, at most to ready/2 per tick
    (700.0, 1, 20),   # max_replicas
])
def test_stable_mode_sizes_on_the_window_average(concurrency: float, replicas: int, expected: int) -> None:
    # constant load, one decision after a full window (not following, so the first decision shows the rules)
    cfg = replace(CFG, panic_threshold=1000.0)
    _, decisions = run(cfg, lambda t: concurrency, until=59, replicas=replicas, follow=False)
    assert last(decisions).desired == expected
    assert not last(decisions).panic


def test_a_burst_triggers_panic_and_panic_never_scales_down() -> None:
    def load(t: float) -> float:
        return 70.0 if 30 <= t < 40 else 5.0  # 10 replicas' worth for 10 s
    _, decisions = run(CFG, load, until=150)
    at = dict(decisions)
    assert not at[29].panic and at[29].desired == 1
    assert at[30].panic and at[30].kind == "panic" and at[30].desired > 1  # the first tick of the burst
    assert at[35].desired >= 10  # the panic window is all burst: 70 / 7
    # burst over: still in panic, so the peak is kept...
    assert at[45].panic and at[45].desired == at[39].desired
    # ...until the panic condition has been absent for a whole stable window
    assert at[100].panic is False
    assert at[150].desired == 1


def test_a_slow_ramp_does_not_panic() -> None:
    _, decisions = run(CFG, lambda t: 7.0 * (1 + t / 60), until=120)
    assert not any(d.panic for _, d in decisions)
    assert last(decisions).desired == 3  # 17.5 in flight on average over the last minute


@pytest.mark.parametrize(("field", "value", "ready", "want", "expected"), [
    ("max_scale_up_rate", 2.0, 2, 10, 4),
    ("max_scale_down_rate", 2.0, 8, 1, 4),
    ("max_scale_down_rate", 4.0, 8, 1, 2),
])
def test_rate_limits_bound_each_step(field: str, value: float, ready: int, want: int, expected: int) -> None:
    cfg = replace(CFG, **{field: value}, panic_threshold=1000.0, tolerance=0.0)
    policy = Policy(cfg)
    samples = [Sample(time=t, replicas=ready, ready=ready, concurrency=want * 7.0) for t in range(60)]
    d = policy.decide(samples, 59)
    assert d.desired == expected and d.kind == "rate_limited"


def test_scale_down_delay_keeps_the_highest_recent_desire() -> None:
    cfg = replace(CFG, scale_down_delay=30.0, stable_window=10.0, panic_window=5.0, panic_threshold=1000.0)
    _, decisions = run(cfg, lambda t: 35.0 if t < 20 else 7.0, until=100)
    at = dict(decisions)
    assert at[19].desired == 5
    assert at[40].desired == 5 and at[40].kind == "delay"  # load dropped at 20, delay holds 5 until ~50
    assert at[100].desired == 1


def test_min_replicas_holds_a_floor() -> None:
    _, decisions = run(replace(CFG, min_replicas=3), lambda t: 0.0, until=10, replicas=3)
    assert last(decisions).desired == 3


def test_scale_to_zero_only_after_the_grace_period_without_traffic() -> None:
    cfg = replace(CFG, min_replicas=0, scale_to_zero=True, scale_to_zero_grace=30.0, stable_window=10.0,
                  panic_window=2.0)
    _, decisions = run(cfg, lambda t: 3.0 if t < 20 else 0.0, until=80)
    at = dict(decisions)
    assert at[19].desired == 1
    assert at[45].desired == 1          # idle for 25 s: within the grace period
    assert at[60].desired == 0 and any(d.kind == "scale_to_zero" for _, d in decisions)


def test_without_scale_to_zero_an_idle_pool_keeps_one_replica() -> None:
    _, decisions = run(CFG, lambda t: 0.0, until=120)
    assert last(decisions).desired == 1


def test_held_requests_activate_a_pool_at_zero() -> None:
    cfg = replace(CFG, min_replicas=0, scale_to_zero=True)
    policy = Policy(cfg)
    # no replica, so no metrics but what the balancer holds
    d = policy.decide([Sample(time=0, replicas=0, ready=0, held=2)], 0)
    assert d.desired == 1 and d.kind == "activation"
    d = policy.decide([Sample(time=1, replicas=0, ready=0, concurrency=0.0, held=4)], 1)
    assert d.desired == 1


def test_no_data_holds_the_current_scale_and_says_so() -> None:
    policy = Policy(CFG)
    samples = [Sample(time=t, replicas=3, ready=3) for t in range(10)]
    d = policy.decide(samples, 9)
    assert d.desired == 3 and d.kind == "no_data" and "no metrics" in d.reason


def test_missing_ticks_are_left_out_of_the_average_not_counted_as_zero() -> None:
    policy = Policy(replace(CFG, panic_threshold=1000.0))
    samples = [Sample(time=t, replicas=1, ready=1, concurrency=21.0 if t % 2 else None) for t in range(60)]
    assert policy.decide(samples, 59).desired == 3


@pytest.mark.parametrize(("mode", "fields", "expected"), [
    ("rps", {"rps": 140.0}, 2),        # target 100 rps x 0.7
    ("queue", {"queue": 29.0}, 5),     # target 10 queued x 0.7 -> 29 / 7 = 4.1
])
def test_rps_and_queue_modes(mode: str, fields: dict[str, float], expected: int) -> None:
    cfg = replace(CFG, mode=mode, target=100.0 if mode == "rps" else 10.0, panic_threshold=1000.0)  # type: ignore[arg-type]
    _, decisions = run(cfg, lambda t: fields, until=59, follow=False)
    assert last(decisions).desired == expected


def test_slo_sizing_follows_littles_law_and_the_p99_target() -> None:
    # 100 req/s x 10 ms = 1 busy instance; p99 < 100 ms allows 1 - ln(100) x 10/100 = 54% busy -> 2
    n, rho, reachable = slo_replicas(100.0, 0.010, 1, 0.100, 0.9)
    assert (n, reachable) == (2, True) and rho == pytest.approx(0.5395, abs=1e-3)
    # two instances per replica halve it
    assert slo_replicas(100.0, 0.010, 2, 0.100, 0.9)[0] == 1
    # a service time near the target cannot meet it at any utilization
    assert slo_replicas(10.0, 0.030, 1, 0.100, 0.9)[2] is False


def test_slo_mode_calibrates_the_queueing_model_on_the_measured_p99() -> None:
    cfg = replace(CFG, mode="slo", slo_p99_ms=100.0, panic_threshold=1000.0)
    # 60 req/s x 10 ms on 2 replicas: 30% busy, M/M/1 predicts p99 = ln(100) x 10 ms / 0.7 = 66 ms
    steady = {"rps": 60.0, "service_s": 0.010}
    # measured as predicted: 0.6 busy instances need two replicas to stay at <= 54% busy
    _, decisions = run(cfg, lambda t: {**steady, "p99_ms": 66.0}, until=59, replicas=2, follow=False)
    assert last(decisions).desired == 2
    # measured far better than predicted (steady service times): the model learns it, one replica will do
    policy, decisions = run(cfg, lambda t: {**steady, "p99_ms": 15.0}, until=59, replicas=2, follow=False)
    assert last(decisions).desired == 1 and policy._slo_calibration < 0.4
    # measured worse than the target at the current scale: more, whatever the model says
    _, decisions = run(cfg, lambda t: {**steady, "p99_ms": 150.0}, until=59, replicas=2, follow=False)
    assert last(decisions).desired >= 3


def test_slo_mode_falls_back_to_concurrency_until_service_time_is_measured() -> None:
    cfg = replace(CFG, mode="slo", panic_threshold=1000.0)
    _, decisions = run(cfg, lambda t: {"rps": 50.0, "concurrency": 14.0}, until=59, follow=False)
    assert last(decisions).desired == 2 and "no service time" in last(decisions).reason


def test_every_knob_is_validated_with_its_name() -> None:
    with pytest.raises(ConfigError) as info:
        load(PolicyConfig, {"target": 0, "panic_window": 100, "stable_window": 60, "min_replicas": 0,
                            "max_replicas": 0, "mode": "latency", "tolerance": 1.5})
    text = "\n".join(info.value.errors)
    for needle in ("target: must be > 0", "panic_window: must be within", "min_replicas: may be 0 only",
                   "max_replicas: must be >=", "mode: must be one of", "tolerance: must be within"):
        assert needle in text


def test_slo_mode_does_not_flap_on_the_boundary_of_a_replica() -> None:
    # 240 req/s x 15 ms = 3.6 busy instances; at 90% busy that is 4.0 replicas, give or take the noise
    cfg = replace(CFG, mode="slo", panic_threshold=1000.0, slo_max_utilization=0.9)
    for service in (0.0149, 0.0151):
        _, decisions = run(cfg, lambda t, s=service: {"rps": 240.0, "service_s": s, "p99_ms": 50.0},
                           until=59, replicas=4, follow=False)
        assert last(decisions).desired == 4, last(decisions).reason


def test_slo_mode_scales_down_only_with_measured_headroom() -> None:
    cfg = replace(CFG, mode="slo", panic_threshold=1000.0)
    fields = {"rps": 60.0, "service_s": 0.010}
    _, decisions = run(cfg, lambda t: {**fields, "p99_ms": 80.0}, until=59, replicas=4, follow=False)
    assert last(decisions).desired == 4 and "not below 70%" in last(decisions).reason
