"""Pickers and their load measurement, driven by a fake clock and a seeded RNG."""

from __future__ import annotations

import heapq
import itertools
import random
from collections import Counter
from typing import Any

import pytest

from modelyard.balancer.endpoint import Endpoint, NoEndpoint, Outcome, Snapshot
from modelyard.balancer.load import PeakEwma as PeakEwmaLoad
from modelyard.balancer.pickers import (
    PICKERS,
    LeastConn,
    LeastLatency,
    PeakEwma,
    RandomPicker,
    RoundRobin,
    WeightedRoundRobin,
)
from modelyard.clock import FakeClock


def snap(*eps: Endpoint, version: int = 1) -> Snapshot:
    return Snapshot.of("p", tuple(eps), version=version)


def eps(n: int) -> list[Endpoint]:
    return [Endpoint(f"127.0.10.{i}:1") for i in range(n)]


def test_registry_names_every_policy() -> None:
    assert set(PICKERS) == {"round_robin", "weighted_round_robin", "random", "least_conn", "peak_ewma", "least_latency"}


@pytest.mark.parametrize("name", sorted(PICKERS))
def test_empty_snapshot_raises_no_endpoint_naming_the_pool(name: str) -> None:
    with pytest.raises(NoEndpoint, match="pool 'p'"):
        PICKERS[name](rng=random.Random(1)).pick(snap())


@pytest.mark.parametrize("name", sorted(PICKERS))
def test_exclude_avoids_the_failed_endpoint_unless_it_is_the_only_one(name: str) -> None:
    a, b = eps(2)
    picker = PICKERS[name](rng=random.Random(2), clock=FakeClock())
    assert all(picker.pick(snap(a, b), exclude=(a,)) is b for _ in range(20))
    assert picker.pick(snap(a), exclude=(a,)) is a


def test_round_robin_cycles_evenly() -> None:
    e = eps(3)
    rr = RoundRobin(rng=random.Random(0))
    counts = Counter(rr.pick(snap(*e)).address for _ in range(300))
    assert set(counts.values()) == {100}


def test_weighted_round_robin_is_smooth_and_proportional() -> None:
    a, b = eps(2)
    a.weight, b.weight = 3.0, 1.0
    wrr = WeightedRoundRobin()
    seq = [wrr.pick(snap(a, b)) for _ in range(8)]
    assert seq.count(a) == 6 and seq.count(b) == 2
    # smooth: b is not picked twice in a row
    assert all(not (x is b and y is b) for x, y in itertools.pairwise(seq))


def test_random_respects_weights() -> None:
    a, b = eps(2)
    a.weight, b.weight = 9.0, 1.0
    r = RandomPicker(rng=random.Random(3))
    share = sum(r.pick(snap(a, b)) is a for _ in range(5000)) / 5000
    assert 0.87 < share < 0.93


def test_least_conn_prefers_fewer_outstanding() -> None:
    a, b = eps(2)
    a.outstanding, b.outstanding = 10, 0
    lc = LeastConn(rng=random.Random(4))
    assert all(lc.pick(snap(a, b)) is b for _ in range(50))


def test_least_conn_p2c_never_picks_the_most_loaded_of_three() -> None:
    e = eps(3)
    for i, x in enumerate(e):
        x.outstanding = i * 5
    lc = LeastConn(rng=random.Random(5))
    picked = Counter(lc.pick(snap(*e)).address for _ in range(600))
    assert picked[e[2].address] == 0 and picked[e[0].address] > picked[e[1].address]


def test_peak_ewma_jumps_to_peaks_and_decays_with_tau() -> None:
    clock = FakeClock()
    load = PeakEwmaLoad(clock.now(), rtt_prior=0.01, tau=1.0)
    load.observe(clock.now(), 0.5)
    assert load.rtt == pytest.approx(0.5)  # peak sensitive
    clock.advance(1.0)
    load.observe(clock.now(), 0.1)
    # blended with weight exp(-1) on the old value
    assert load.rtt == pytest.approx(0.5 * 0.36788 + 0.1 * (1 - 0.36788), rel=1e-3)


def test_peak_ewma_estimate_decays_over_idle_time() -> None:
    clock = FakeClock()
    load = PeakEwmaLoad(clock.now(), rtt_prior=1.0, tau=2.0)
    clock.advance(2.0)
    assert load.estimate(clock.now()) == pytest.approx(0.36788, rel=1e-3)
    assert load.cost(clock.now(), outstanding=3) == pytest.approx(4 * 0.36788, rel=1e-3)


def _simulate_closed_loop(picker: PeakEwma, clock: FakeClock, endpoints: list[Endpoint], service: list[float],
                         rng: random.Random, clients: int = 32, requests: int = 20000, warmup: int = 1000,
                         hiccup_rate: float = 0.0) -> Counter[str]:
    """Closed-loop clients through ``picker`` against endpoints with the given service times (s).

    Endpoints serve requests concurrently (asyncio-style, no queueing); ``hiccup_rate`` of the requests
    to any endpoint take 30 ms longer (a GC pause, a descheduled process). Returns picks after warm-up.
    """
    snapshot = snap(*endpoints)
    # (time, tie-break, endpoint answering or None for a client's next send, send time)
    events: list[tuple[float, int, Endpoint | None, float]] = []
    seq = itertools.count()
    for _ in range(clients):
        heapq.heappush(events, (clock.now() + rng.random() * 0.005, next(seq), None, 0.0))
    picks: Counter[str] = Counter()
    done = 0
    while done < requests:
        t, _, ep, t0 = heapq.heappop(events)
        clock.t = t
        if ep is None:  # a client sends its next request
            ep = picker.pick(snapshot)
            ep.outstanding += 1
            d = service[endpoints.index(ep)] * rng.uniform(0.9, 1.2)
            if rng.random() < hiccup_rate:
                d += 0.030
            if done >= warmup:
                picks[ep.address] += 1
            heapq.heappush(events, (t + d, next(seq), ep, t))
        else:  # a response arrives
            ep.outstanding -= 1
            picker.on_done(ep, Outcome.SUCCESS, t - t0)
            done += 1
            heapq.heappush(events, (t, next(seq), None, 0.0))
    return picks


def test_peak_ewma_avoids_slow_endpoint() -> None:
    clock = FakeClock()
    fast1, fast2, slow = eps(3)
    pe = PeakEwma(clock=clock, rng=random.Random(6))
    picks = _simulate_closed_loop(pe, clock, [fast1, fast2, slow], [0.005, 0.005, 0.055], random.Random(1),
                                  hiccup_rate=0.001)
    total = sum(picks.values())
    # fewer than 1% of requests go to the slow endpoint, so it stays out of the p99
    assert picks[slow.address] / total < 0.01
    assert abs(picks[fast1.address] - picks[fast2.address]) / total < 0.05


def test_peak_ewma_forgets_a_healthy_endpoints_hiccup_within_samples() -> None:
    clock = FakeClock()
    load = PeakEwmaLoad(clock.now(), rtt_prior=0.005, tau=10.0, min_weight=0.1)
    load.observe(clock.now(), 0.035)  # one 35 ms hiccup
    for _ in range(20):
        clock.advance(0.002)
        load.observe(clock.now(), 0.005)
    # forgotten after 20 samples (40 ms), not after tau = 10 s
    assert load.estimate(clock.now()) < 0.009
    # with the purely time-based blend it would still look like the hiccup
    old = PeakEwmaLoad(clock.now(), rtt_prior=0.005, tau=10.0, min_weight=0.0)
    old.observe(clock.now(), 0.035)
    for _ in range(20):
        clock.advance(0.002)
        old.observe(clock.now(), 0.005)
    assert old.estimate(clock.now()) > 0.030


def test_peak_ewma_steers_new_picks_away_from_a_stalled_request() -> None:
    clock = FakeClock()
    a, b, stalled = eps(3)
    pe = PeakEwma(clock=clock, rng=random.Random(11))
    for e in (a, b, stalled):
        pe.on_done(e, Outcome.SUCCESS, 0.005)
    stalled.outstanding = 1  # a request that has not come back yet
    picked = Counter(pe.pick(snap(a, b, stalled)).address for _ in range(300))
    # P2C: the stalled endpoint loses every pair it is drawn in
    assert picked[stalled.address] == 0 and picked[a.address] > 100 and picked[b.address] > 100
    # once the stall completes its 2 s latency keeps it out (until it decays over ~tau)
    stalled.outstanding = 0
    pe.on_done(stalled, Outcome.SUCCESS, 2.0)
    clock.advance(1.0)
    assert all(pe.pick(snap(a, b, stalled)) is not stalled for _ in range(100))


def test_peak_ewma_counts_outstanding_requests() -> None:
    clock = FakeClock()
    a, b = eps(2)
    pe = PeakEwma(clock=clock, rng=random.Random(7))
    pe.on_done(a, Outcome.SUCCESS, 0.002)
    pe.on_done(b, Outcome.SUCCESS, 0.003)
    a.outstanding = 5  # 0.002 * 6 > 0.003 * 1
    assert pe.pick(snap(a, b)) is b


def test_peak_ewma_penalises_fast_failures() -> None:
    clock = FakeClock()
    healthy, failing = eps(2)
    pe = PeakEwma(clock=clock, rng=random.Random(8), failure_penalty=0.5)
    pe.on_done(healthy, Outcome.SUCCESS, 0.010)
    pe.on_done(failing, Outcome.FAILURE, 0.0001)  # fails in 0.1 ms: must not look fast
    assert all(pe.pick(snap(healthy, failing)) is healthy for _ in range(50))


def test_peak_ewma_new_endpoint_starts_from_the_prior() -> None:
    clock = FakeClock()
    (e,) = eps(1)
    pe = PeakEwma(clock=clock, rtt_prior=0.123)
    assert pe.load_of(e).estimate(clock.now()) == pytest.approx(0.123)


def test_weights_scale_p2c_costs() -> None:
    clock = FakeClock()
    a, b = eps(2)
    a.weight, b.weight = 0.1, 1.0  # a is slow-starting
    lc = LeastConn(rng=random.Random(9), clock=clock)
    assert all(lc.pick(snap(a, b)) is b for _ in range(20))


def test_unknown_picker_option_is_rejected() -> None:
    with pytest.raises(TypeError, match="no options"):
        RoundRobin(bogus=1)


# ------------------------------------------------------------------ least_latency (latency measured against load)


def feed(picker: Any, e: Endpoint, clock: FakeClock, latency_of: Any, inflights: range, rounds: int = 3) -> None:
    """Answers from ``e`` at each in-flight count, ``latency_of(n)`` seconds each, 1 ms apart."""
    for _ in range(rounds):
        for n in inflights:
            clock.advance(0.001)
            picker.on_done(e, Outcome.SUCCESS, latency_of(n), n)


def test_least_latency_learns_that_a_burst_does_not_slow_an_io_bound_endpoint() -> None:
    clock = FakeClock()
    fast, slow = eps(2)
    picker = LeastLatency(clock=clock, rng=random.Random(5))
    feed(picker, fast, clock, lambda n: 0.005, range(0, 20))   # 5 ms whatever the load (sleeping backend)
    feed(picker, slow, clock, lambda n: 0.055, range(0, 3))
    fast.outstanding = 16  # a synchronized burst
    assert all(picker.pick(snap(fast, slow)) is fast for _ in range(50))
    # Peak-EWMA charges the burst 17 x 5 ms = 85 ms and sends it to the slow one
    pe = PeakEwma(clock=clock, rng=random.Random(5))
    for e, lat in ((fast, 0.005), (slow, 0.055)):
        for _ in range(30):
            clock.advance(0.001)
            pe.on_done(e, Outcome.SUCCESS, lat)
    assert all(pe.pick(snap(fast, slow)) is slow for _ in range(50))


def test_least_latency_charges_what_load_measurably_adds_on_a_cpu_bound_endpoint() -> None:
    clock = FakeClock()
    a, b = eps(2)
    picker = LeastLatency(clock=clock, rng=random.Random(6))
    feed(picker, a, clock, lambda n: 0.002 * (n + 1), range(0, 12))  # serial: each in flight adds 2 ms
    feed(picker, b, clock, lambda n: 0.002 * (n + 1), range(0, 12))
    model = picker.load_of(a)
    assert model.ratio == pytest.approx(1.0, rel=0.15) and model.estimate(clock.now()) == pytest.approx(0.002, abs=0.001)
    a.outstanding, b.outstanding = 8, 2
    assert all(picker.pick(snap(a, b)) is b for _ in range(50))


def test_least_latency_steers_away_from_a_stall_and_probes_again_later() -> None:
    clock = FakeClock()
    a, b = eps(2)
    picker = LeastLatency(clock=clock, rng=random.Random(7), tau=10.0)
    feed(picker, a, clock, lambda n: 0.005, range(0, 4))
    feed(picker, b, clock, lambda n: 0.005, range(0, 4))
    picker.on_done(a, Outcome.SUCCESS, 2.0, 0)  # one request stalled 2 s
    assert all(picker.pick(snap(a, b)) is b for _ in range(50))
    for _ in range(60):  # a minute of b answering in 5 ms while a is left alone: a's stall is forgotten
        clock.advance(1.0)
        picker.on_done(b, Outcome.SUCCESS, 0.005, 0)
    assert any(picker.pick(snap(a, b)) is a for _ in range(50))


def test_least_latency_assumes_peak_ewmas_model_until_load_is_measured() -> None:
    clock = FakeClock()
    (a,) = eps(1)
    picker = LeastLatency(clock=clock)
    feed(picker, a, clock, lambda n: 0.004, range(0, 1), rounds=20)  # only ever one at a time
    assert picker.load_of(a).ratio == 1.0
    assert picker.load_of(a).cost(clock.now(), 3) == pytest.approx(4 * picker.load_of(a).estimate(clock.now()))


def test_least_latency_penalises_fast_failures() -> None:
    clock = FakeClock()
    a, b = eps(2)
    picker = LeastLatency(clock=clock, rng=random.Random(8))
    feed(picker, b, clock, lambda n: 0.010, range(0, 4))
    for _ in range(5):
        picker.on_done(a, Outcome.FAILURE, 0.0001, 0)
    assert all(picker.pick(snap(a, b)) is b for _ in range(50))


def test_power_of_d_choices_compares_every_good_endpoint_beside_a_bad_one() -> None:
    """With P2C, a pair holding the bad endpoint sends its pick to the other one of the pair whatever its
    load (a third of the picks in a pool of 3); with d = 3 the cheaper good endpoint always wins."""
    from modelyard.balancer.endpoint import Entry
    from modelyard.balancer.pickers.p2c import pick_best, pick_two

    good, busy, bad = eps(3)
    entries = (Entry(good, 1.0), Entry(busy, 1.0), Entry(bad, 1.0))
    costs = {good: 1.0, busy: 2.0, bad: 100.0}

    def cost(e: Entry) -> float:
        return costs[e.endpoint]

    rng = random.Random(7)
    two = Counter(pick_two(entries, rng, cost) for _ in range(3000))
    three = Counter(pick_best(entries, rng, cost, 3) for _ in range(3000))
    assert bad not in two and bad not in three
    assert 800 < two[busy] < 1200  # the (busy, bad) pair: one pick in three
    assert three == Counter({good: 3000})
    # ties spread over the endpoints (the scan starts at a random one), and d < n draws d distinct ones
    tied = Counter(pick_best(entries, rng, lambda e: 1.0, 3) for _ in range(3000))
    assert all(800 < tied[e] < 1200 for e in (good, busy, bad))
    five = tuple(Entry(e, 1.0) for e in eps(5))
    assert len({pick_best(five, rng, lambda e: 0.0, 3) for _ in range(200)}) == 5


def test_least_latency_compares_three_and_takes_choices_as_an_option() -> None:
    from modelyard.balancer.pickers.least_latency import LeastLatency

    assert LeastLatency().choices == 3 and LeastLatency(choices=2).choices == 2
    with pytest.raises(ValueError, match="choices"):
        LeastLatency(choices=1)
