"""Load for ``modelyard bench``.

- **closed loop** (:func:`run_bench`): N workers, each sending its next request when the last returns;
- **open loop** (:func:`run_open_loop`): requests leave on a schedule -- a constant rate, or a
  profile of steps and ramps (``50:10,200:20,20..200:30``: 50 req/s for 10 s, 200 for 20 s, a ramp
  from 20 to 200 over 30 s) -- whether or not earlier ones were answered, as independent users
  would send them. The report then has a per-second timeline (sent, answered, errors, p50, p99).
"""

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


@dataclass(frozen=True, slots=True)
class Segment:
    """``seconds`` of load going linearly from ``start`` to ``end`` requests/s (equal: a step)."""

    start: float
    end: float
    seconds: float

    def rate(self, t: float) -> float:
        return self.start + (self.end - self.start) * min(max(t / self.seconds, 0.0), 1.0)


def parse_profile(text: str) -> list[Segment]:
    """``RATE:SECONDS`` (a step) or ``RATE1..RATE2:SECONDS`` (a ramp), comma-separated."""
    segments = []
    for part in (p.strip() for p in text.split(",")):
        rates, sep, seconds = part.partition(":")
        a, dots, b = rates.partition("..")
        try:
            start = float(a)
            end = float(b) if dots else start
            secs = float(seconds)
        except ValueError:
            raise ValueError(f"profile segment {part!r}: expected RATE:SECONDS or RATE1..RATE2:SECONDS") from None
        if not sep or secs <= 0 or start < 0 or end < 0:
            raise ValueError(f"profile segment {part!r}: rates must be >= 0 and seconds > 0")
        segments.append(Segment(start, end, secs))
    if not segments:
        raise ValueError("empty profile")
    return segments


def profile_rate(segments: list[Segment], t: float) -> float | None:
    """The scheduled rate at ``t`` seconds into the run; None after the end."""
    for seg in segments:
        if t < seg.seconds:
            return seg.rate(t)
        t -= seg.seconds
    return None


@dataclass(slots=True)
class BenchReport:
    """What one run measured; latencies are of successful requests only."""

    model: str
    concurrency: int
    elapsed_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    #: open loop: the profile, and (send time in s, latency s or None, error code or None) per request
    profile: str = ""
    records: list[tuple[float, float | None, str | None]] = field(default_factory=list)

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

    def timeline(self, step: float = 1.0) -> list[dict[str, float]]:
        """Open loop: per ``step`` seconds of send time -- sent, ok, errors, p50 and p99 (ms) of the answered."""
        if not self.records:
            return []
        n = int(max(t for t, _, _ in self.records) // step) + 1
        buckets: list[list[tuple[float | None, str | None]]] = [[] for _ in range(n)]
        for t, lat, err in self.records:
            buckets[int(t // step)].append((lat, err))
        rows = []
        for i, b in enumerate(buckets):
            ok = sorted(lat for lat, err in b if err is None and lat is not None)
            rows.append({"t": i * step, "sent": len(b) / step, "ok": len(ok) / step,
                         "errors": sum(1 for _, err in b if err is not None),
                         "p50_ms": percentile(ok, 50) * 1e3, "p99_ms": percentile(ok, 99) * 1e3})
        return rows

    def as_dict(self) -> dict[str, object]:
        ordered = sorted(self.latencies_s)
        extra: dict[str, object] = {"profile": self.profile, "timeline": self.timeline()} if self.profile else {}
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
            **extra,
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


async def run_open_loop(
    client: AsyncInferenceClient,
    model: str,
    inputs: Mapping[str, np.ndarray],
    profile: list[Segment],
    *,
    version: str = "",
    request_timeout: float | None = None,
    max_inflight: int = 2000,
    profile_text: str = "",
    on_progress: Callable[[float, int, int], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> BenchReport:
    """Send on the ``profile``'s schedule, whatever the answers do; at most ``max_inflight`` outstanding
    (beyond it a request is counted as ``CLIENT_OVERLOADED`` instead of sent: the target is far behind).

    ``on_progress(elapsed_s, sent, answered)`` is called about ten times a second.
    """
    report = BenchReport(model=model, concurrency=0, profile=profile_text)
    total = sum(seg.seconds for seg in profile)
    start = clock()
    pending: set[asyncio.Task[None]] = set()
    answered = 0

    async def one(sent_at: float) -> None:
        nonlocal answered
        t0 = clock()
        try:
            await client.infer(model, inputs, version=version, timeout=request_timeout)
        except InferenceServerError as exc:
            report.errors[exc.code.name] += 1
            report.records.append((sent_at, None, exc.code.name))
        else:
            lat = clock() - t0
            report.latencies_s.append(lat)
            report.records.append((sent_at, lat, None))
        answered += 1

    next_at = 0.0  # send time of the next request, seconds into the run
    sent = 0
    last_progress = -1.0
    while True:
        rate = profile_rate(profile, next_at)
        if rate is None:
            break
        if rate <= 0:  # a pause: look again a little later
            next_at += 0.01
            continue
        delay = next_at - (clock() - start)
        if delay > 0:
            await asyncio.sleep(delay)
        if len(pending) >= max_inflight:
            report.errors["CLIENT_OVERLOADED"] += 1
            report.records.append((next_at, None, "CLIENT_OVERLOADED"))
        else:
            task = asyncio.ensure_future(one(next_at))
            pending.add(task)
            task.add_done_callback(pending.discard)
            sent += 1
        next_at += 1.0 / rate
        now = clock() - start
        if on_progress is not None and now - last_progress >= 0.1:
            last_progress = now
            on_progress(min(now, total), sent, answered)
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    report.elapsed_s = clock() - start
    report.concurrency = max_inflight
    if on_progress is not None:
        on_progress(total, sent, answered)
    return report
