"""The batch planner is pure: every test drives it with explicit times (a fake clock)."""

from __future__ import annotations

import pytest

from modelyard.server.errors import InvalidInput, Overloaded
from modelyard.server.model_config import DynamicBatching
from modelyard.server.scheduling.planner import BatchPlanner, PlannerConfig


def planner(**kw: object) -> BatchPlanner:
    base: dict[str, object] = {"max_batch_size": 8}
    base.update(kw)
    return BatchPlanner(PlannerConfig(**base))  # type: ignore[arg-type]


def sizes(batch: list) -> list[int]:  # type: ignore[type-arg]
    return [p.size for p in batch]


def test_zero_delay_sends_whatever_is_queued_at_once() -> None:
    p = planner(max_queue_delay=0.0)
    p.submit(1, 0.0)
    p.submit(2, 0.0)
    plan = p.plan(0.0)
    assert sizes(plan.batch) == [1, 2]
    assert len(p) == 0


def test_waits_for_queue_delay_then_sends_partial_batch() -> None:
    p = planner(max_queue_delay=0.010)
    p.submit(1, 0.0)
    p.submit(1, 0.004)
    first = p.plan(0.005)
    assert first.batch == []
    assert first.wake_at == pytest.approx(0.010)
    later = p.plan(0.010)
    assert sizes(later.batch) == [1, 1]


def test_full_batch_goes_before_the_delay() -> None:
    p = planner(max_batch_size=4, max_queue_delay=1.0)
    for _ in range(4):
        p.submit(1, 0.0)
    assert sizes(p.plan(0.001).batch) == [1, 1, 1, 1]


def test_batch_never_exceeds_max_batch_size_and_rest_waits() -> None:
    p = planner(max_batch_size=4, max_queue_delay=1.0)
    for _ in range(6):
        p.submit(1, 0.0)
    plan = p.plan(0.0)
    assert sizes(plan.batch) == [1, 1, 1, 1]
    # two left; more than a batch was queued so they are not held for long: asked again at the timer
    assert len(p) == 2


def test_rows_of_multi_row_requests_count_towards_the_batch() -> None:
    p = planner(max_batch_size=8, max_queue_delay=1.0)
    p.submit(3, 0.0)
    p.submit(3, 0.0)
    p.submit(3, 0.0)  # does not fit with the first two
    plan = p.plan(0.0)
    # the queue holds more than a batch: the first two go at once, the third waits its turn
    assert sizes(plan.batch) == [3, 3]
    assert p.queued_rows == 3


def test_preferred_batch_size_sends_as_soon_as_reached() -> None:
    p = planner(max_batch_size=16, preferred_batch_sizes=(4, 8), max_queue_delay=1.0)
    for _ in range(4):
        p.submit(1, 0.0)
    assert p.plan(0.0).batch == []  # 4 is preferred but 8 may still come
    for _ in range(5):
        p.submit(1, 0.0)
    assert sizes(p.plan(0.0).batch) == [1] * 8
    assert len(p) == 1


def test_delay_expiry_cuts_to_largest_preferred_size() -> None:
    p = planner(max_batch_size=16, preferred_batch_sizes=(4, 8), max_queue_delay=0.002)
    for _ in range(6):
        p.submit(1, 0.0)
    plan = p.plan(0.002)
    assert sizes(plan.batch) == [1] * 4
    assert len(p) == 2
    assert plan.wake_at == pytest.approx(0.002)  # the remainder is already past its delay


def test_expired_requests_are_returned_and_never_batched() -> None:
    p = planner(max_queue_delay=0.010)
    late = p.submit(1, 0.0, deadline=0.005)
    ok = p.submit(1, 0.0, deadline=1.0)
    plan = p.plan(0.006)
    assert plan.expired == [late]
    assert plan.batch == []
    assert p.plan(0.010).batch == [ok]


def test_default_timeout_applies_when_request_has_none() -> None:
    p = planner(max_queue_delay=1.0, default_timeout=0.1)
    item = p.submit(1, 0.0)
    assert item.deadline == pytest.approx(0.1)
    assert p.plan(0.05).wake_at == pytest.approx(0.1)
    assert p.plan(0.1).expired == [item]


def test_client_deadline_earlier_than_default_timeout_wins() -> None:
    p = planner(default_timeout=10.0)
    assert p.submit(1, 0.0, deadline=2.0).deadline == 2.0


def test_queue_full_is_overloaded() -> None:
    p = planner(max_queue_delay=1.0, max_queue_size=2)
    p.submit(1, 0.0)
    p.submit(1, 0.0)
    with pytest.raises(Overloaded):
        p.submit(1, 0.0)


def test_request_larger_than_max_batch_size_is_invalid() -> None:
    with pytest.raises(InvalidInput):
        planner(max_batch_size=4).submit(5, 0.0)


def test_higher_priority_level_is_served_first() -> None:
    p = planner(max_batch_size=2, max_queue_delay=0.0, priority_levels=3, default_priority_level=2)
    low = p.submit(1, 0.0, priority=3)
    default = p.submit(1, 0.0)  # 0 -> default level 2
    high = p.submit(1, 0.0, priority=1)
    assert p.plan(0.0).batch == [high, default]
    assert p.plan(0.0).batch == [low]


def test_priority_outside_levels_is_invalid() -> None:
    p = planner(priority_levels=2, default_priority_level=1)
    with pytest.raises(InvalidInput):
        p.submit(1, 0.0, priority=3)


def test_removed_request_leaves_the_queue() -> None:
    p = planner(max_queue_delay=1.0)
    a = p.submit(1, 0.0)
    b = p.submit(1, 0.0)
    assert p.remove(a)
    assert not p.remove(a)
    assert p.plan(1.0).batch == [b]


def test_without_idle_instance_only_deadlines_wake_the_batcher() -> None:
    p = planner(max_queue_delay=0.0)
    p.submit(1, 0.0, deadline=0.5)
    plan = p.plan(0.0, can_dispatch=False)
    assert plan.batch == []
    assert plan.wake_at == pytest.approx(0.5)
    assert len(p) == 1


def test_from_config_converts_microseconds() -> None:
    db = DynamicBatching(preferred_batch_size=[4, 64], max_queue_delay_microseconds=2500,
                         default_timeout_microseconds=1_000_000, max_queue_size=7)
    cfg = PlannerConfig.from_config(32, db)
    assert cfg.max_queue_delay == pytest.approx(0.0025)
    assert cfg.default_timeout == pytest.approx(1.0)
    assert cfg.preferred_batch_sizes == (4,)
    assert cfg.max_queue_size == 7


def test_drain_returns_everything_queued() -> None:
    p = planner(max_queue_delay=1.0, priority_levels=2, default_priority_level=1)
    items = [p.submit(1, 0.0, priority=2), p.submit(1, 0.0)]
    assert sorted(i.seq for i in p.drain()) == sorted(i.seq for i in items)
    assert len(p) == 0 and p.queued_rows == 0
