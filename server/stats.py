"""Per model-version statistics in Triton's ModelStatistics shape (counts and nanoseconds).

Updated and read on the event loop only, so they need no lock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass(slots=True)
class BatchStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


class ModelStats:
    """Counters for one model version (event-loop thread only)."""

    def __init__(self) -> None:
        self.success = Duration()
        self.fail = Duration()
        self.queue = Duration()
        self.compute_input = Duration()
        self.compute_infer = Duration()
        self.compute_output = Duration()
        self.cache_hit = Duration()
        self.cache_miss = Duration()
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self.batches: dict[int, BatchStats] = {}

    def request_done(self, ok: bool, total_ns: int) -> None:
        (self.success if ok else self.fail).add(total_ns)
        self.last_inference_ms = int(time.time() * 1000)

    def batch_done(self, size: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        self.execution_count += 1
        self.inference_count += size
        for total, ns in ((self.compute_input, input_ns), (self.compute_infer, infer_ns), (self.compute_output, output_ns)):
            total.count += size
            total.ns += ns
        b = self.batches.get(size)
        if b is None:
            b = self.batches[size] = BatchStats()
        b.compute_input.add(input_ns)
        b.compute_infer.add(infer_ns)
        b.compute_output.add(output_ns)

    def cache(self, hit: bool, ns: int) -> None:
        (self.cache_hit if hit else self.cache_miss).add(ns)
