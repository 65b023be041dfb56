"""Ensembles: graph checks at parse and load time, and how steps run (concurrently, pruned, failing loudly).

In-process: a ModelRepository of small python models on a temporary directory, no torch.
"""

from __future__ import annotations

import asyncio
import textwrap
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml

from modelyard.config import ConfigError
from modelyard.server.admission import Admission
from modelyard.server.errors import ModelyardError
from modelyard.server.model_config import dependencies, parse_config, to_proto
from modelyard.server.repository import ModelRepository
from modelyard.server.types import InferRequest

FP32 = "TYPE_FP32"

#: a python model: Y = f(X) after an optional sleep; it also reports what the step request carried
MODEL_PY = '''
import time
import numpy as np
from modelyard.server.types import InferResponse

class Model:
    def execute(self, requests):
        out = []
        for r in requests:
            time.sleep({sleep})
            x = r.inputs["X"]
            if {fail!r}:
                raise ValueError("bad pixels")
            out.append(InferResponse(outputs={{
                "Y": ({expr}).astype(np.float32),
                "SEEN": np.array([[r.deadline is not None, r.parameters.get("tag") == "t1"]], dtype=bool),
            }}))
        return out
'''

ADD_PY = '''
from modelyard.server.types import InferResponse

class Model:
    def execute(self, requests):
        return [InferResponse(outputs={"SUM": r.inputs["A"] + r.inputs["B"]}) for r in requests]
'''


def _tensor(name: str, dims: list[int], dtype: str = FP32) -> dict[str, Any]:
    return {"name": name, "data_type": dtype, "dims": dims}


def _write(repo: Path, name: str, config: dict[str, Any], code: str | None = None) -> None:
    (repo / name / "1").mkdir(parents=True, exist_ok=True)
    (repo / name / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if code is not None:
        (repo / name / "1" / "model.py").write_text(textwrap.dedent(code))


def _python_model(repo: Path, name: str, expr: str, sleep: float = 0.0, fail: bool = False,
                  dtype: str = FP32) -> None:
    _write(repo, name, {
        "backend": "python", "max_batch_size": 8,
        "input": [_tensor("X", [2], dtype)],
        "output": [_tensor("Y", [2]), _tensor("SEEN", [2], "TYPE_BOOL")],
    }, MODEL_PY.format(sleep=sleep, fail=fail, expr=expr))


def _step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> dict[str, Any]:
    return {"model_name": model, "model_version": -1, "input_map": inputs, "output_map": outputs}


def _ensemble(steps: list[dict[str, Any]], inputs: list[str] = ("IN",), outputs: list[str] = ("OUT",),
              max_batch_size: int = 8) -> dict[str, Any]:
    return {"platform": "ensemble", "max_batch_size": max_batch_size,
            "input": [_tensor(n, [2]) for n in inputs], "output": [_tensor(n, [2]) for n in outputs],
            "ensemble_scheduling": {"step": steps}}


@pytest.fixture
def diamond(tmp_path: Path) -> Path:
    """IN -> plus_one -> A, IN -> double -> B, add(A, B) -> OUT; each branch sleeps 0.3 s."""
    _python_model(tmp_path, "plus_one", "x + 1", sleep=0.3)
    _python_model(tmp_path, "double", "x * 2", sleep=0.3)
    _write(tmp_path, "add", {"backend": "python", "max_batch_size": 8,
                             "input": [_tensor("A", [2]), _tensor("B", [2])], "output": [_tensor("SUM", [2])]},
           ADD_PY)
    _write(tmp_path, "diamond", _ensemble([
        _step("add", {"A": "a", "B": "b"}, {"SUM": "OUT"}),  # listed first: order is not execution order
        _step("plus_one", {"X": "IN"}, {"Y": "a", "SEEN": "SEEN"}),
        _step("double", {"X": "IN"}, {"Y": "b"}),
    ], outputs=["OUT", "a"]) | {"output": [_tensor("OUT", [2]), _tensor("a", [2]), _tensor("SEEN", [2], "TYPE_BOOL")]})
    return tmp_path


def _parse_errors(config: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(config, "ens")
    return info.value.errors


# ------------------------------------------------------------------ graph checks (the config alone)


def test_a_cycle_between_steps_is_rejected_naming_the_steps():
    errors = _parse_errors(_ensemble([
        _step("m1", {"X": "IN", "Z": "c"}, {"Y": "b"}),
        _step("m2", {"X": "b"}, {"Y": "c"}),
        _step("m3", {"X": "b"}, {"Y": "OUT"}),
    ]))
    assert errors == ["ensemble_scheduling.step: the steps form a cycle: step[0] ('m1') -> step[1] ('m2') -> step[0] ('m1')"]


def test_a_step_input_nobody_produces_is_rejected_with_its_path():
    errors = _parse_errors(_ensemble([_step("m1", {"X": "IN", "Z": "ghost"}, {"Y": "OUT"})]))
    assert errors == ["ensemble_scheduling.step[0].input_map.Z: ensemble tensor 'ghost' is neither an ensemble input "
                      "nor produced by any step"]


def test_an_unused_ensemble_input_and_an_unproduced_output_are_rejected():
    errors = _parse_errors(_ensemble([_step("m1", {"X": "IN"}, {"Y": "OUT"})],
                                     inputs=["IN", "EXTRA"], outputs=["OUT", "MISSING"]))
    assert errors == ["input[1].name: ensemble input 'EXTRA' is not used by any step",
                      "output[1].name: ensemble output 'MISSING' is not produced by any step's output_map"]


def test_a_tensor_produced_twice_or_overwriting_an_input_is_rejected():
    errors = _parse_errors(_ensemble([
        _step("m1", {"X": "IN"}, {"Y": "OUT"}),
        _step("m2", {"X": "IN"}, {"Y": "OUT", "W": "IN"}),
    ]))
    assert errors == ["ensemble_scheduling.step[1].output_map.Y: ensemble tensor 'OUT' is already produced by "
                      "step[0] ('m1')",
                      "ensemble_scheduling.step[1].output_map.W: ensemble tensor 'IN' is an ensemble input: "
                      "no step may produce it"]


def test_ensemble_fields_are_checked_together():
    errors = _parse_errors({"platform": "ensemble", "dynamic_batching": {}, "max_batch_size": 4,
                            "ensemble_scheduling": {"step": [{"model_name": "ens", "model_version": 0}]}})
    assert "input: an ensemble needs at least one input" in errors
    assert "dynamic_batching: an ensemble is not batched itself: each step is batched by its own model's scheduler" in errors
    assert "ensemble_scheduling.step[0].model_name: an ensemble cannot be a step of itself" in errors
    assert "ensemble_scheduling.step[0].model_version: must be -1 (latest) or a positive version, got 0" in errors
    assert "ensemble_scheduling.step[0].input_map: must map at least one model input to an ensemble tensor" in errors
    assert _parse_errors({"platform": "ensemble"}) == ["ensemble_scheduling: is required for platform: ensemble"]
    assert "ensemble_scheduling: is only for platform: ensemble (platform is '')" in _parse_errors(
        {"ensemble_scheduling": {"step": []}})


def test_dependencies_and_the_wire_config_list_the_steps():
    cfg = parse_config(_ensemble([_step("m1", {"X": "IN"}, {"Y": "t"}), _step("m2", {"X": "t"}, {"Y": "u"}),
                                  _step("m1", {"X": "u"}, {"Y": "OUT"})]), "ens")
    assert dependencies(cfg) == ["m1", "m2"]
    assert dependencies(parse_config({}, "plain")) == []
    msg = to_proto(cfg)
    assert (msg.platform, msg.backend) == ("ensemble", "")
    assert [s.model_name for s in msg.ensemble_scheduling.step] == ["m1", "m2", "m1"]
    assert dict(msg.ensemble_scheduling.step[1].input_map) == {"X": "t"}
    assert msg.ensemble_scheduling.step[0].model_version == -1


# ------------------------------------------------------------------ load-time checks (with the steps' models)


async def _load_error(repo: Path, name: str) -> str:
    r = ModelRepository(repo)
    try:
        with pytest.raises(ModelyardError) as info:
            await r.load(name)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        return info.value.message
    finally:
        await r.close()


async def test_an_unknown_step_model_fails_the_ensemble_load(tmp_path: Path):
    _write(tmp_path, "ens", _ensemble([_step("nope", {"X": "IN"}, {"Y": "OUT"})]))
    message = await _load_error(tmp_path, "ens")
    assert "ensemble_scheduling: step model 'nope' failed to load: " in message
    assert message.count("'nope'") >= 2, message  # the step and the repository's own reason both name it


async def test_mapping_to_tensors_a_model_lacks_or_of_another_type_fails_the_load(tmp_path: Path):
    _python_model(tmp_path, "ints", "x", dtype="TYPE_INT32")
    _write(tmp_path, "ens", _ensemble([_step("ints", {"X": "IN", "NOPE": "IN"}, {"Y": "OUT", "Z": "z"})],
                                      max_batch_size=16))
    message = await _load_error(tmp_path, "ens")
    assert "ensemble_scheduling.step[0].model_name: the ensemble allows batch size 16 but model 'ints' only 8" in message
    assert "ensemble_scheduling.step[0].input_map.NOPE: model 'ints' has no input 'NOPE'" in message
    assert "ensemble_scheduling.step[0].output_map.Z: model 'ints' has no output 'Z'" in message
    assert ("ensemble_scheduling.step[0].input_map.X: ensemble tensor 'IN' is inconsistent: datatype FP32 from "
            "ensemble input 'IN' but INT32 in input 'X' of model 'ints'") in message


async def test_ensembles_that_contain_each_other_fail_instead_of_deadlocking(tmp_path: Path):
    _write(tmp_path, "e1", {**_ensemble([_step("e2", {"IN": "IN"}, {"OUT": "OUT"})])})
    _write(tmp_path, "e2", {**_ensemble([_step("e1", {"IN": "IN"}, {"OUT": "OUT"})])})
    message = await asyncio.wait_for(_load_error(tmp_path, "e1"), 10)
    assert "ensembles form a cycle: e1 -> e2 -> e1" in message


# ------------------------------------------------------------------ running


async def test_loading_an_ensemble_loads_its_steps_and_independent_branches_run_concurrently(diamond: Path):
    repo = ModelRepository(diamond)
    try:
        await repo.load("diamond")
        assert set(repo.models) == {"diamond", "add", "plus_one", "double"}
        x = np.array([[1, 2], [3, 4]], np.float32)
        t0 = time.perf_counter()
        out = await repo.get("diamond").infer(InferRequest(model="diamond", inputs={"IN": x}, id="r1",
                                                           parameters={"tag": "t1"}, deadline=time.monotonic() + 30))
        took = time.perf_counter() - t0
        assert took < 0.55, f"branches ran one after the other ({took:.2f}s)"
        np.testing.assert_array_equal(out.outputs["OUT"], (x + 1) + x * 2)
        np.testing.assert_array_equal(out.outputs["a"], x + 1)
        assert out.outputs["SEEN"].all(), "the deadline and parameters reach the steps"
        assert (out.model, out.id) == ("diamond", "r1")
        # statistics: the ensemble counts one request; every composing model counts its step
        assert repo.get("diamond").stats.success.count == 1
        assert repo.get("diamond").stats.inference_count == 2
        assert [repo.get(m).stats.success.count for m in ("plus_one", "double", "add")] == [1, 1, 1]
    finally:
        await repo.close()


async def test_steps_not_needed_for_the_requested_outputs_do_not_run(diamond: Path):
    repo = ModelRepository(diamond)
    try:
        await repo.load_all()
        assert repo.get("plus_one").stats.success.count == 0
        out = await repo.get("diamond").infer(InferRequest(model="diamond", inputs={"IN": np.ones((1, 2), np.float32)},
                                                           outputs=["a"]))
        assert list(out.outputs) == ["a"]
        assert [repo.get(m).stats.success.count for m in ("plus_one", "double", "add")] == [1, 0, 0]
    finally:
        await repo.close()


async def test_a_failing_step_fails_the_request_naming_its_model_and_cancels_the_rest(tmp_path: Path):
    _python_model(tmp_path, "broken", "x", fail=True)
    _python_model(tmp_path, "slow", "x", sleep=1.0)
    _write(tmp_path, "ens", _ensemble([_step("broken", {"X": "IN"}, {"Y": "OUT"}), _step("slow", {"X": "IN"}, {"Y": "S"})],
                                      outputs=["OUT", "S"]))
    repo = ModelRepository(tmp_path)
    try:
        await repo.load("ens")
        with pytest.raises(ModelyardError) as info:
            await repo.get("ens").infer(InferRequest(model="ens", inputs={"IN": np.ones((1, 2), np.float32)}))
        assert info.value.code == grpc.StatusCode.INTERNAL
        assert info.value.message == "in ensemble 'ens', step 0 (model 'broken'): ValueError: bad pixels"
        assert repo.get("ens").stats.fail.count == 1 and repo.get("broken").stats.fail.count == 1
        # the deadline reaches the step's scheduler, and its status code comes back unchanged
        with pytest.raises(ModelyardError) as info:
            await repo.get("ens").infer(InferRequest(model="ens", inputs={"IN": np.ones((1, 2), np.float32)},
                                                     outputs=["S"], deadline=time.monotonic() - 1))
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert info.value.message.startswith("in ensemble 'ens', step 1 (model 'slow'): request deadline passed")
    finally:
        await repo.close()


async def test_a_step_whose_model_was_unloaded_fails_naming_it(diamond: Path):
    repo = ModelRepository(diamond)
    try:
        await repo.load("diamond")
        await repo.unload("double")
        with pytest.raises(ModelyardError) as info:
            await repo.get("diamond").infer(InferRequest(model="diamond", inputs={"IN": np.ones((1, 2), np.float32)}))
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        assert info.value.message.startswith("in ensemble 'diamond', step 2 (model 'double'): ")
        assert "'double'" in info.value.message.split(": ", 1)[1]
    finally:
        await repo.close()


async def test_a_step_pinned_to_a_version_runs_that_version_and_a_missing_one_fails_the_load(tmp_path: Path):
    _python_model(tmp_path, "ver", "x + 1")
    (tmp_path / "ver" / "2").mkdir()
    (tmp_path / "ver" / "2" / "model.py").write_text(
        (tmp_path / "ver" / "1" / "model.py").read_text().replace("(x + 1)", "(x + 2)"))
    config = yaml.safe_load((tmp_path / "ver" / "config.yaml").read_text())
    (tmp_path / "ver" / "config.yaml").write_text(yaml.safe_dump({**config, "version_policy": {"all": {}}}))
    _write(tmp_path, "pinned", _ensemble([_step("ver", {"X": "IN"}, {"Y": "OUT"}) | {"model_version": 1}]))
    _write(tmp_path, "latest", _ensemble([_step("ver", {"X": "IN"}, {"Y": "OUT"})]))
    _write(tmp_path, "absent", _ensemble([_step("ver", {"X": "IN"}, {"Y": "OUT"}) | {"model_version": 3}]))
    repo = ModelRepository(tmp_path)
    try:
        await repo.load("pinned")
        await repo.load("latest")
        x = np.zeros((1, 2), np.float32)
        for name, want in (("pinned", 1), ("latest", 2)):
            out = await repo.get(name).infer(InferRequest(model=name, inputs={"IN": x}))
            np.testing.assert_array_equal(out.outputs["OUT"], x + want)
        with pytest.raises(ModelyardError, match=r"step\[0\].model_version: model 'ver' has no version 3 loaded "
                                                 r"\(loaded: \['1', '2'\]\)"):
            await repo.load("absent")
    finally:
        await repo.close()


async def test_the_servers_inflight_bound_counts_an_ensemble_request_once_not_per_step(diamond: Path):
    repo = ModelRepository(diamond, admission=Admission(limit=1))
    try:
        await repo.load("diamond")
        x = np.ones((1, 2), np.float32)
        first = asyncio.create_task(repo.get("diamond").infer(InferRequest(model="diamond", inputs={"IN": x})))
        for _ in range(1000):  # until the first request holds the server's one slot
            if repo.admission.inflight:
                break
            await asyncio.sleep(0)
        with pytest.raises(ModelyardError, match=r"overload\.max_inflight") as info:  # a second client request
            await repo.get("diamond").infer(InferRequest(model="diamond", inputs={"IN": x}))
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        out = await first  # its three steps were not refused by the slot the ensemble request holds
        np.testing.assert_array_equal(out.outputs["OUT"], (x + 1) + x * 2)
        assert repo.admission.inflight == 0
    finally:
        await repo.close()


async def test_an_ensemble_can_be_the_step_of_another(diamond: Path):
    _write(diamond, "outer", _ensemble([_step("diamond", {"IN": "IN"}, {"OUT": "d"}),
                                        _step("double", {"X": "d"}, {"Y": "OUT"})]))
    repo = ModelRepository(diamond)
    try:
        await repo.load("outer")
        x = np.ones((1, 2), np.float32)
        out = await repo.get("outer").infer(InferRequest(model="outer", inputs={"IN": x}))
        np.testing.assert_array_equal(out.outputs["OUT"], ((x + 1) + x * 2) * 2)
    finally:
        await repo.close()
