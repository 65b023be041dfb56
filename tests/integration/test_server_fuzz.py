"""Fuzzing a live ``modelyard serve`` with hypothesis: built ModelInferRequests, mutated protobuf bytes and
REST bodies. Every answer is a proper status naming the problem (never INTERNAL/UNKNOWN, HTTP 500 or a
traceback), a valid tensor round-trips, the process stays up and its memory stays bounded; a shape whose
element count overflows or exceeds the message limit is refused before anything is allocated for it.

CI runs a few dozen examples per property (a few seconds); set MODELYARD_FUZZ_EXAMPLES for more
(e.g. 5000 for a long local run).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelyard.protos import grpc_service_pb2 as pb
from modelyard.protos.tensors import DTYPES, TensorError, deserialize_bytes, to_raw
from modelyard.server.demo_models import DEMO_REPOSITORY

EXAMPLES = int(os.environ.get("MODELYARD_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not os.environ.get("MODELYARD_FUZZ_EXAMPLES"),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MAX_MB = 1
LIMIT = MAX_MB * 1024 * 1024
INFER = "/inference.GRPCInferenceService/ModelInfer"
#: what bad input may answer; INTERNAL, UNKNOWN, UNAVAILABLE never
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.RESOURCE_EXHAUSTED}
NUMERIC = [d for d in DTYPES if d != "BYTES"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, server_cls):
    repo = tmp_path_factory.mktemp("fuzz")
    for name in ("identity", "add_sub", "text_sentiment_demo"):
        shutil.copytree(DEMO_REPOSITORY / name, repo / name)
    srv = server_cls("--model-repository", str(repo), "--max-message-mb", str(MAX_MB))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def call(server):
    channel = grpc.insecure_channel(server.grpc_url, options=[("grpc.max_send_message_length", 4 * LIMIT)])
    raw = channel.unary_unary(INFER)  # bytes in, bytes out: mutated messages go as they are

    def send(body: bytes) -> tuple[grpc.StatusCode, str, bytes]:
        try:
            return grpc.StatusCode.OK, "", raw(body, timeout=20)
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or "", b""  # type: ignore[attr-defined]

    yield send
    channel.close()


def memory(server) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """VmRSS and VmHWM (peak) of the server process, in KiB."""
    out = {}
    for line in Path(f"/proc/{server.pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def check(code: grpc.StatusCode, details: str) -> None:
    assert code in ALLOWED, (code, details)
    if code != grpc.StatusCode.OK:
        assert details and "Traceback" not in details, details


# ---------------------------------------------------------------------- strategies

DIM = st.one_of(st.integers(0, 4), st.integers(-3, -1),
                st.sampled_from([2**31, 2**32, 2**62, 2**63 - 1, -(2**63), LIMIT, LIMIT + 1]))
SHAPE = st.lists(DIM, max_size=4) | st.lists(st.integers(0, 1), min_size=30, max_size=40)
DATATYPE = st.sampled_from([*DTYPES, "FP8", "", "fp32", "STRING"])
FIELDS = ["bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents", "fp32_contents",
          "fp64_contents", "bytes_contents"]


@st.composite
def tensors(draw: Any) -> tuple[pb.ModelInferRequest.InferInputTensor, bytes | None]:
    """An input tensor header with raw data (right size, wrong size, BYTES with wild length prefixes) or typed
    contents in any field."""
    t = pb.ModelInferRequest.InferInputTensor(name=draw(st.sampled_from(["INPUT0", "INPUT1", "TEXT", "X", ""])),
                                              datatype=draw(DATATYPE), shape=draw(SHAPE))
    how = draw(st.sampled_from(["exact", "random", "bytes", "typed", "none"]))
    if how == "typed":
        field = draw(st.sampled_from(FIELDS))
        n = draw(st.integers(0, 6))
        values = {"bool_contents": st.booleans(), "int_contents": st.integers(-(2**31), 2**31 - 1),
                  "int64_contents": st.integers(-(2**63), 2**63 - 1), "uint_contents": st.integers(0, 2**32 - 1),
                  "uint64_contents": st.integers(0, 2**64 - 1), "fp32_contents": st.floats(width=32),
                  "fp64_contents": st.floats(), "bytes_contents": st.binary(max_size=8)}[field]
        getattr(t.contents, field).extend(draw(st.lists(values, min_size=n, max_size=n)))
        return t, None
    if how == "none":
        return t, None
    if how == "bytes":
        parts = []
        for _ in range(draw(st.integers(0, 4))):
            payload = draw(st.binary(max_size=8))
            declared = draw(st.sampled_from([len(payload), len(payload) + 1, 0, 2**32 - 1]))
            parts.append(struct.pack("<I", declared) + payload)
        return t, b"".join(parts) + draw(st.binary(max_size=3))
    dt = DTYPES.get(t.datatype)
    count = int(np.prod([max(d, 0) for d in t.shape], dtype=object)) if t.shape else 1
    if how == "exact" and dt is not None and t.datatype != "BYTES" and count * dt.itemsize <= 4096:
        return t, draw(st.binary(min_size=count * dt.itemsize, max_size=count * dt.itemsize))
    return t, draw(st.binary(max_size=64))


@st.composite
def infer_requests(draw: Any) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name=draw(st.sampled_from(["identity", "add_sub", "text_sentiment_demo",
                                                                "nope", ""])))
    raw = []
    for t, data in draw(st.lists(tensors(), max_size=3)):
        msg.inputs.append(t)
        if data is not None:
            raw.append(data)
    if raw and draw(st.booleans()):
        msg.raw_input_contents.extend(raw)
    if draw(st.booleans()):
        msg.parameters["timeout"].int64_param = draw(st.integers(-5, 10**6))
    if draw(st.booleans()):
        msg.outputs.add(name=draw(st.sampled_from(["OUTPUT0", "NOPE"])))
    return msg


# ---------------------------------------------------------------------- gRPC


@FUZZ
@given(msg=infer_requests())
def test_grpc_built_requests_get_a_proper_status(call, msg):
    code, details, _ = call(msg.SerializeToString())
    check(code, details)
    for t in msg.inputs:
        if any(d < 0 for d in t.shape) and code != grpc.StatusCode.NOT_FOUND and msg.model_name:
            assert code != grpc.StatusCode.OK


@FUZZ
@given(seed=infer_requests(), edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255),
                                                        st.sampled_from(["flip", "insert", "delete", "cut"])),
                                              min_size=1, max_size=6))
def test_grpc_mutated_bytes_get_a_proper_status(call, seed, edits):
    """Corrupted protobuf: invalid UTF-8 in string fields, bad varints, lengths past the end, truncation."""
    body = bytearray(seed.SerializeToString())
    for pos, byte, op in edits:
        i = pos % (len(body) + 1)
        if op == "flip" and body:
            body[i % len(body)] ^= byte or 0x80
        elif op == "insert":
            body[i:i] = bytes([byte])
        elif op == "delete" and body:
            del body[i % len(body)]
        elif op == "cut":
            del body[i:]
    code, details, _ = call(bytes(body))
    check(code, details)


@FUZZ
@given(dtype=st.sampled_from(NUMERIC), shape=st.lists(st.integers(0, 4), max_size=3), data=st.data())
def test_grpc_valid_tensors_round_trip_through_identity(call, dtype, shape, data):
    count = int(np.prod(shape)) if shape else 1
    raw = data.draw(st.binary(min_size=count * DTYPES[dtype].itemsize, max_size=count * DTYPES[dtype].itemsize))
    msg = pb.ModelInferRequest(model_name="identity")
    msg.inputs.add(name="INPUT0", datatype=dtype, shape=shape)
    msg.raw_input_contents.append(raw)
    code, details, out = call(msg.SerializeToString())
    assert code == grpc.StatusCode.OK, details
    resp = pb.ModelInferResponse.FromString(out)
    assert list(resp.outputs[0].shape) == shape and resp.outputs[0].datatype == dtype
    assert resp.raw_output_contents[0] == raw


@FUZZ
@given(raw=st.binary(max_size=64), count=st.integers(0, 6))
def test_grpc_bytes_tensors_parse_exactly_or_are_refused(call, raw, count):
    msg = pb.ModelInferRequest(model_name="identity")
    msg.inputs.add(name="INPUT0", datatype="BYTES", shape=[count])
    msg.raw_input_contents.append(raw)
    code, details, out = call(msg.SerializeToString())
    try:
        expected = deserialize_bytes(raw, count, "INPUT0")
    except TensorError:
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "INPUT0" in details, (code, details)
        return
    assert code == grpc.StatusCode.OK, details
    assert pb.ModelInferResponse.FromString(out).raw_output_contents[0] == b"".join(
        struct.pack("<I", len(x)) + x for x in expected)


@pytest.mark.parametrize("shape", [[2**32, 2**32], [2**62, 4], [LIMIT + 1], [0, 2**62], [1024, 1024, 2], [2**31] * 3])
@pytest.mark.parametrize("how", ["raw", "typed", "bytes"])
def test_huge_shapes_are_refused_before_allocation(server, call, shape, how):
    """The element count is checked against the message limit first: no allocation, at once."""
    msg = pb.ModelInferRequest(model_name="identity")
    t = msg.inputs.add(name="INPUT0", datatype="BYTES" if how == "bytes" else "FP32", shape=shape)
    if how == "typed":
        t.contents.fp32_contents.extend([1.0])
    else:
        msg.raw_input_contents.append(b"\x00" * 8)
    before = memory(server)
    t0 = time.monotonic()
    code, details, _ = call(msg.SerializeToString())
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert "INPUT0" in details and ("elements" in details or "dimension larger" in details), details
    assert time.monotonic() - t0 < 2.0
    assert memory(server)["VmHWM"] - before["VmHWM"] < 20 * 1024, "no allocation for the shape"


# ---------------------------------------------------------------------- REST

JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                    max_leaves=20)


@st.composite
def rest_inputs(draw: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": draw(st.sampled_from(["INPUT0", "INPUT1", "TEXT", "", 5, None])),
        "datatype": draw(DATATYPE | st.integers()),
        "shape": draw(SHAPE | JSON),
    }
    if draw(st.booleans()):
        entry["data"] = draw(JSON | st.lists(st.integers(-300, 300) | st.floats() | st.text(max_size=4), max_size=8))
    if draw(st.booleans()):
        entry["parameters"] = draw(st.fixed_dictionaries({}, optional={"binary_data_size": st.integers(-2, 80) | JSON,
                                                                          "shared_memory_region": JSON}) | JSON)
    return entry


@st.composite
def rest_bodies(draw: Any) -> tuple[bytes, dict[str, str]]:
    doc: Any = {"inputs": draw(st.lists(rest_inputs(), max_size=3) | JSON)}
    for key in ("parameters", "outputs", "id"):
        if draw(st.booleans()):
            doc[key] = draw(JSON)
    head = json.dumps(doc).encode()
    kind = draw(st.sampled_from(["json", "binary", "garbage", "utf8"]))
    if kind == "garbage":
        return draw(st.binary(max_size=200)), {}
    if kind == "utf8":  # invalid UTF-8 inside the JSON
        return head[:-1] + b', "x": "\xff\xfe"}', {}
    if kind == "binary":
        tail = draw(st.binary(max_size=80))
        length = draw(st.sampled_from([len(head), len(head) + 3, 0, -1, 10**12]))
        return head + tail, {"Inference-Header-Content-Length": str(length)}
    return head, {}


@FUZZ
@given(model=st.sampled_from(["identity", "add_sub", "text_sentiment_demo", "nope"]), body=rest_bodies())
def test_rest_bodies_get_a_proper_status(server, model, body):
    data, headers = body
    req = urllib.request.Request(f"{server.http_url}/v2/models/{model}/infer", data=data, method="POST",
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            status, answer = resp.status, None
    except urllib.error.HTTPError as exc:
        status, answer = exc.code, json.loads(exc.read())
    assert status in (200, 400, 404, 413), (status, answer)
    if status != 200:
        assert isinstance(answer, dict) and answer.get("error") and "Traceback" not in answer["error"], answer


def test_found_by_fuzzing(server, call):
    """What these fuzzers found before the fixes: a negative dimension passed with typed contents
    ([-1, 2] became [1, 2]), values in another contents field than the datatype's were ignored, and
    deeply nested JSON was a 500 (RecursionError)."""
    msg = pb.ModelInferRequest(model_name="identity")
    msg.inputs.add(name="INPUT0", datatype="FP32", shape=[-1, 2]).contents.fp32_contents.extend([1, 2])
    code, details, _ = call(msg.SerializeToString())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "negative dimension" in details, details
    msg = pb.ModelInferRequest(model_name="identity")
    t = msg.inputs.add(name="INPUT0", datatype="FP32", shape=[0])
    t.contents.int_contents.extend([1, 2])
    code, details, _ = call(msg.SerializeToString())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "int_contents is set" in details, details
    body = b'{"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1], "data": ' + b"[" * 50000 + b"]" * 50000 + b"}]}"
    req = urllib.request.Request(f"{server.http_url}/v2/models/identity/infer", data=body, method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=20)
    assert err.value.code == 400 and "too deeply" in json.loads(err.value.read())["error"]


def test_server_survives_with_bounded_memory(server, call):
    """Runs after the fuzzers (file order): the process is up, answers, and its memory did not run away."""
    assert server.alive()
    msg = pb.ModelInferRequest(model_name="identity")
    msg.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    msg.raw_input_contents.append(to_raw(np.arange(4, dtype=np.float32).reshape(1, 4)))
    code, details, _ = call(msg.SerializeToString())
    assert code == grpc.StatusCode.OK, details
    mem = memory(server)
    # a fresh server on these models takes ~100-150 MiB; messages are 1 MiB at most
    assert mem["VmHWM"] < 600 * 1024, mem
    assert server.read_log().count("Traceback") == 0, server.log_tail()
