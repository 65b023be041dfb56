"""Warmup runs before READY: the model is not ready (so health is NOT_SERVING) until every sample ran."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest

from modelyard.server.execution.runtimes.base import Result, Runtime
from modelyard.server.metrics import ServerMetrics
from modelyard.server.model import LOADING, READY, ModelVersion
from modelyard.server.model_config import ModelConfig, TensorSpec, WarmupSample
from modelyard.server.types import InferRequest, InferResponse

gate = threading.Event()
seen: list[str] = []


class SlowWarmRuntime(Runtime):
    def execute(self, requests: list[InferRequest]) -> list[Result]:
        seen.extend(r.id for r in requests)
        gate.wait(10)
        return [InferResponse(outputs={"Y": r.inputs["X"]}) for r in requests]


async def test_model_is_not_ready_until_warmup_finished(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = ModelConfig(name="m", max_batch_size=4, inputs=[TensorSpec("X", "FP32", [2])],
                      outputs=[TensorSpec("Y", "FP32", [2])],
                      model_warmup=[WarmupSample(name="zeros", batch_size=2, count=2,
                                                 inputs={"X": {"data_type": "TYPE_FP32", "dims": [2]}})])
    metrics = ServerMetrics()
    monkeypatch.setattr("modelyard.server.execution.instances.runtime_class", lambda *a: SlowWarmRuntime)
    mv = ModelVersion(cfg, "1", Path("."), metrics)
    loading = asyncio.create_task(mv.load())
    loop = asyncio.get_running_loop()
    end = loop.time() + 5
    while not seen:
        assert loop.time() < end
        await asyncio.sleep(0.001)
    assert mv.state == LOADING
    assert 'modelyard_model_ready{model="m",version="1"} 1.0' not in metrics.render().decode()
    gate.set()
    await loading
    assert mv.state == READY
    assert seen == ["warmup:zeros", "warmup:zeros"]
    text = metrics.render().decode()
    assert 'modelyard_model_warmup_seconds{model="m",version="1"}' in text
    assert 'modelyard_model_load_seconds{model="m",version="1"}' in text
    out = await mv.infer(InferRequest(model="m", inputs={"X": np.ones((1, 2), np.float32)}))
    assert out.outputs["Y"].shape == (1, 2)
    await mv.unload()
