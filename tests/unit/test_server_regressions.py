"""Regressions found in review: each was a way to freeze, leak or crash the server."""

from __future__ import annotations

import asyncio
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from modelyard.protos import grpc_service_pb2 as pb
from modelyard.server.errors import InvalidInput
from modelyard.server.execution.instances import Instance
from modelyard.server.execution.runtimes.base import Runtime
from modelyard.server.frontends.grpc_codec import decode_request
from modelyard.server.model_config import parse_config
from modelyard.server.repository import ModelRepository
from modelyard.server.scheduling.planner import BatchPlanner, PlannerConfig
from modelyard.server.types import InferRequest
from modelyard.server.validation import validate_request


def test_zero_row_request_to_a_batching_model_is_invalid_even_for_any_inputs():
    cfg = parse_config({"max_batch_size": 8, "dynamic_batching": {},
                        "input": [{"name": "X", "data_type": "FP32", "accept_datatypes": ["INT8"]}],
                        "output": [{"name": "Y", "data_type": "FP32", "dims": [-1]}]},
                       "m")
    with pytest.raises(InvalidInput, match=r"input 'X': batch size 0 outside 1..max_batch_size"):
        validate_request(cfg, InferRequest(model="m", inputs={"X": np.zeros((0, 3), np.float32)}))
    with pytest.raises(InvalidInput, match="at least one row"):
        BatchPlanner(PlannerConfig(max_batch_size=8)).submit(0, 0.0)


@pytest.mark.parametrize("shape", [[1] * 70, [0, 2**62]])
def test_malformed_shapes_are_invalid_argument_naming_the_tensor(shape):
    msg = pb.ModelInferRequest(model_name="m")
    msg.inputs.add(name="X", datatype="FP32", shape=shape)
    msg.raw_input_contents.append(b"" if 0 in shape else b"\x00" * 4)
    with pytest.raises(InvalidInput, match="input 'X'"):
        decode_request(msg)


class _Calls(Runtime):
    def execute(self, requests):  # pragma: no cover - not used
        return []


async def test_a_fast_result_is_not_held_behind_a_slow_job():
    inst = Instance("t", _Calls(parse_config({}, "t"), Path(".")))
    try:
        fast = inst.call(lambda: "fast")
        slow = inst.call(time.sleep, 0.5)
        assert await asyncio.wait_for(fast, 0.3) == "fast"
        await slow
    finally:
        await asyncio.get_running_loop().run_in_executor(None, inst.close)


async def test_a_model_whose_warmup_fails_leaves_no_thread_behind(tmp_path: Path):
    (tmp_path / "wfail" / "1").mkdir(parents=True)
    (tmp_path / "wfail" / "config.yaml").write_text(textwrap.dedent('''\
        backend: python
        max_batch_size: 4
        dynamic_batching: {}
        instance_group: [{count: 2}]
        input: [{name: X, data_type: FP32, dims: [1]}]
        output: [{name: Y, data_type: FP32, dims: [1]}]
        model_warmup: [{name: w, inputs: {X: {data_type: FP32, dims: [1], zero_data: true}}}]
    '''))
    (tmp_path / "wfail" / "1" / "model.py").write_text(textwrap.dedent('''\
        class Model:
            def execute(self, requests):
                raise RuntimeError("broken weights")
    '''))
    repo = ModelRepository(tmp_path)
    for _ in range(3):
        with pytest.raises(Exception, match="broken weights"):
            await repo.load("wfail")
    deadline = time.monotonic() + 5
    while any(t.name.startswith("modelyard-wfail") for t in threading.enumerate()):
        assert time.monotonic() < deadline, [t.name for t in threading.enumerate()]
        await asyncio.sleep(0.01)
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("batcher-wfail")]
    assert not repo.is_ready("wfail")
