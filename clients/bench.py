"""Closed-loop load: N workers, each sending its next request when the last one returns."""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from modelyard.clients.aio import AsyncInferenceClient
from modelyard.clients.errors import InferenceServerError
from modelyard.percentiles import percentile

PERCENTILES = (50.0, 90.0, 99.0)


@dataclass(slots=True)
class BenchReport:
    """What one run measured; latencies are of successful requests only."""

    model: str
    concurrency: int
    elapsed_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def count(self) -> int:
        return len(self.latencies_s) + sum(self.errors.values())

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def rps(self) -> float:
        return self.count / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def latency_ms(self, q: float) -> float:
        return percentile(sorted(self.latencies_s), q) * 1000.0

    def as_dict(self) -> dict[str, object]:
        ordered = sorted(self.latencies_s)
        return {
            "model": self.model,
            "concurrency": self.concurrency,
            "count": self.count,
            "errors": self.error_count,
            "errors_by_code": dict(self.errors),
            "elapsed_s": round(self.elapsed_s, 6),
            "rps": round(self.rps, 3),
            "latency_ms": {
                "mean": round(1000.0 * sum(ordered) / len(ordered), 3) if ordered else 0.0,
                **{f"p{q:g}": round(percentile(ordered, q) * 1000.0, 3) for q in PERCENTILES},
            },
        }


async def run_bench(
    client: AsyncInferenceClient,
    model: str,
    inputs: Mapping[str, np.ndarray],
    *,
    concurrency: int = 1,
    requests: int | None = None,
    duration: float | None = None,
    version: str = "",
    request_timeout: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> BenchReport:
    """Send requests from ``concurrency`` workers until ``requests`` were sent or ``duration``
    seconds passed (whichever first; at least one bound is required)."""
    if requests is None and duration is None:
        raise ValueError("run_bench needs a bound: requests or duration")
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    report = BenchReport(model=model, concurrency=concurrency)
    start = clock()
    deadline = start + duration if duration is not None else math.inf
    issued = 0

    def claim() -> bool:
        nonlocal issued
        if (requests is not None and issued >= requests) or clock() >= deadline:
            return False
        issued += 1
        return True

    async def worker() -> None:
        while claim():
            t0 = clock()
            try:
                await client.infer(model, inputs, version=version, timeout=request_timeout)
            except InferenceServerError as exc:
                report.errors[exc.code.name] += 1
            else:
                report.latencies_s.append(clock() - t0)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    report.elapsed_s = clock() - start
    return report
