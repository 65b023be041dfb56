"""The autoscaler's metrics source: Prometheus text, counter rates, missing replicas, histogram quantiles."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from modelyard.autoscaler.metrics import (
    MetricsSource,
    Rates,
    SourceConfig,
    histogram_quantile,
    parse_metrics,
    total,
)


def balancer_page(count: int, seconds: float, outstanding: int, held: int = 0, fast: int = 0) -> str:
    return f"""# TYPE modelyard_balancer_request_duration_seconds histogram
modelyard_balancer_request_duration_seconds_bucket{{pool="text",le="0.01"}} {fast}
modelyard_balancer_request_duration_seconds_bucket{{pool="text",le="0.1"}} {count}
modelyard_balancer_request_duration_seconds_bucket{{pool="text",le="+Inf"}} {count}
modelyard_balancer_request_duration_seconds_count{{pool="text"}} {count}
modelyard_balancer_request_duration_seconds_sum{{pool="text"}} {seconds}
modelyard_balancer_request_duration_seconds_count{{pool="other"}} 999
# TYPE modelyard_balancer_outstanding_requests gauge
modelyard_balancer_outstanding_requests{{pool="text",endpoint="a:1"}} {outstanding}
modelyard_balancer_outstanding_requests{{pool="other",endpoint="b:1"}} 50
# TYPE modelyard_balancer_held_requests gauge
modelyard_balancer_held_requests{{pool="text"}} {held}
"""


def replica_page(queue: int, inflight: int, busy: float, count: int) -> str:
    return f"""# TYPE modelyard_queue_depth gauge
modelyard_queue_depth{{model="m",version="1"}} {queue}
modelyard_queue_depth{{model="other",version="1"}} 100
# TYPE modelyard_inflight_requests gauge
modelyard_inflight_requests{{model="m"}} {inflight}
# TYPE modelyard_instance_busy_seconds counter
modelyard_instance_busy_seconds_total{{model="m",version="1",instance="0"}} {busy}
# TYPE modelyard_request_duration_seconds histogram
modelyard_request_duration_seconds_bucket{{model="m",version="1",le="+Inf"}} {count}
modelyard_request_duration_seconds_count{{model="m",version="1"}} {count}
modelyard_request_duration_seconds_sum{{model="m",version="1"}} {count * 0.01}
"""


def test_parse_and_total_filter_by_labels() -> None:
    s = parse_metrics(balancer_page(10, 1.0, 3))
    assert total(s, "modelyard_balancer_outstanding_requests", pool="text") == 3
    assert total(s, "modelyard_balancer_outstanding_requests") == 53


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    assert histogram_quantile(0.5, {0.1: 50.0, 0.2: 100.0, float("inf"): 100.0}) == pytest.approx(0.1)
    assert histogram_quantile(0.75, {0.1: 50.0, 0.2: 100.0, float("inf"): 100.0}) == pytest.approx(0.15)
    assert histogram_quantile(0.99, {}) is None
    assert histogram_quantile(0.99, {0.1: 0.0, float("inf"): 0.0}) is None


def test_rates_need_two_readings_and_ignore_counter_resets() -> None:
    r = Rates()
    assert r.delta("k", 0.0, 10.0) is None
    assert r.delta("k", 2.0, 30.0) == (20.0, 2.0)
    assert r.delta("k", 3.0, 5.0) is None  # restarted: no rate this tick
    assert r.delta("k", 4.0, 15.0) == (10.0, 1.0)


class Pages:
    """An aiohttp server whose /metrics answers what the test sets (or 500 / nothing)."""

    def __init__(self) -> None:
        self.text = ""
        self.status = 200

    async def handler(self, _: web.Request) -> web.Response:
        return web.Response(text=self.text, status=self.status)


@pytest.fixture
async def server() -> AsyncIterator[Any]:
    started = []

    async def start(pages: Pages) -> str:
        app = web.Application()
        app.router.add_get("/metrics", pages.handler)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        started.append(runner)
        return f"127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in started:
        await runner.cleanup()


async def test_balancer_rates_littles_law_concurrency_p99_and_held(server: Any) -> None:
    pages = Pages()
    addr = await server(pages)
    src = MetricsSource("text", SourceConfig(balancer_admin=addr, replicas=False))
    pages.text = balancer_page(100, 5.0, 2)
    first = await src.read(10.0, 1, [])
    assert first.rps is None and first.concurrency == 2  # one reading: no rate yet, the gauge only
    pages.text = balancer_page(300, 25.0, 1, held=4, fast=150)
    second = await src.read(12.0, 1, [])
    assert second.rps == pytest.approx(100.0)
    assert second.concurrency == pytest.approx(10.0)  # 20 latency-seconds accrued in 2 s
    assert second.held == 4
    assert second.p99_ms is not None and 90 < second.p99_ms <= 100
    await src.close()


async def test_a_replica_that_does_not_answer_is_missing_not_zero(server: Any) -> None:
    good, bad = Pages(), Pages()
    a, b = await server(good), await server(bad)
    src = MetricsSource("p", SourceConfig(replicas=True, models=["m"]))
    urls = [f"http://{a}", f"http://{b}"]
    good.text, bad.text = replica_page(4, 2, 0.0, 0), replica_page(8, 6, 0.0, 0)
    both = await src.read(0.0, 2, urls)
    assert both.queue == 12 and not both.missing
    bad.status = 500
    good.text = replica_page(4, 2, 1.0, 100)
    one = await src.read(1.0, 2, urls)
    assert one.missing and one.missing[0].startswith(urls[1])
    assert one.queue == 8  # the answering replica's 4 stands for both ready replicas, never 4 + 0
    assert one.service_s == pytest.approx(0.01)  # 1 busy second over 100 requests
    await src.close()


async def test_no_source_answering_gives_no_data(server: Any) -> None:
    src = MetricsSource("p", SourceConfig(balancer_admin="127.0.0.1:9", replicas=True, timeout=0.5))
    reading = await src.read(0.0, 1, ["http://127.0.0.1:9"])
    assert reading.concurrency is None and reading.rps is None and reading.queue is None
    assert len(reading.missing) == 2
    await src.close()
