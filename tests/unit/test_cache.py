"""Response cache: keys, LRU bounds, read-only hits, and the model path never caching errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from modelyard.protos.tensors import as_bytes_array
from modelyard.server.errors import ModelExecutionError
from modelyard.server.execution.runtimes.base import Result, Runtime
from modelyard.server.metrics import ServerMetrics
from modelyard.server.model import ModelVersion
from modelyard.server.model_config import ModelConfig, TensorSpec
from modelyard.server.model_config import ResponseCache as CacheConfig
from modelyard.server.scheduling.cache import ResponseCache, request_key
from modelyard.server.types import InferRequest, InferResponse


def req(x: float, **params: object) -> InferRequest:
    return InferRequest(model="m", inputs={"X": np.array([[x]], dtype=np.float32)}, parameters=dict(params))


def resp(n: int = 4) -> InferResponse:
    return InferResponse(outputs={"Y": np.zeros(n, dtype=np.float32)})


def test_key_depends_on_inputs_version_and_parameters_but_not_scheduling() -> None:
    base = request_key(req(1.0), "m", "1")
    assert base == request_key(req(1.0), "m", "1")
    assert base != request_key(req(2.0), "m", "1")
    assert base != request_key(req(1.0), "m", "2")
    assert base != request_key(req(1.0, temperature=0.5), "m", "1")
    assert base == request_key(req(1.0, priority=2, timeout=1000), "m", "1")


def test_bytes_elements_are_length_prefixed_in_the_key() -> None:
    a = InferRequest(model="m", inputs={"T": as_bytes_array([b"ab", b"c"], [2])})
    b = InferRequest(model="m", inputs={"T": as_bytes_array([b"a", b"bc"], [2])})
    assert request_key(a, "m", "1") != request_key(b, "m", "1")


def test_lru_evicts_oldest_beyond_max_entries() -> None:
    c = ResponseCache(CacheConfig(enable=True, max_entries=2))
    c.put("a", resp())
    c.put("b", resp())
    assert c.get("a") is not None  # a is now the most recent
    c.put("c", resp())
    assert c.get("b") is None and c.get("a") is not None and len(c) == 2


def test_max_bytes_bounds_the_cache_and_rejects_oversized_entries() -> None:
    c = ResponseCache(CacheConfig(enable=True, max_entries=100, max_bytes=40))
    assert not c.put("huge", resp(100))
    c.put("a", resp(4))  # 16 bytes
    c.put("b", resp(4))
    c.put("c", resp(4))  # 48 > 40: a goes
    assert c.get("a") is None and c.bytes <= 40


def test_hits_are_read_only() -> None:
    c = ResponseCache(CacheConfig(enable=True))
    c.put("k", resp())
    hit = c.get("k")
    assert hit is not None
    with pytest.raises(ValueError):
        hit.outputs["Y"][0] = 1.0


class CountingRuntime(Runtime):
    calls = 0

    def execute(self, requests: list[InferRequest]) -> list[Result]:
        CountingRuntime.calls += 1
        out: list[Result] = []
        for r in requests:
            if float(r.inputs["X"][0, 0]) < 0:
                out.append(ModelExecutionError("negative"))
            else:
                out.append(InferResponse(outputs={"Y": r.inputs["X"] + 1}))
        return out


async def test_model_serves_hits_counts_metrics_and_never_caches_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = ModelConfig(name="m", max_batch_size=4, inputs=[TensorSpec("X", "FP32", [1])],
                      outputs=[TensorSpec("Y", "FP32", [1])], response_cache=CacheConfig(enable=True))
    metrics = ServerMetrics()
    mv = ModelVersion(cfg, "1", Path("."), metrics)
    monkeypatch.setattr("modelyard.server.execution.instances.runtime_class", lambda *a: CountingRuntime)
    await mv.load()
    CountingRuntime.calls = 0
    for _ in range(3):
        assert float((await mv.infer(req(1.0))).outputs["Y"][0, 0]) == 2.0
    assert CountingRuntime.calls == 1
    for _ in range(2):
        with pytest.raises(ModelExecutionError):
            await mv.infer(req(-1.0))
    assert CountingRuntime.calls == 3
    text = metrics.render().decode()
    assert 'modelyard_cache_hits_total{model="m",version="1"} 2.0' in text
    assert 'modelyard_cache_misses_total{model="m",version="1"} 3.0' in text
    assert mv.stats.cache_hit.count == 2
    await mv.unload()
