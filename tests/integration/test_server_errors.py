"""Bad input gets the right status and a message naming the problem; the next valid request succeeds."""

from __future__ import annotations

import shutil
import struct
import textwrap
from pathlib import Path

import grpc
import numpy as np
import pytest

from modelyard.protos import grpc_service_pb2 as pb
from modelyard.protos import grpc_service_pb2_grpc as pb_grpc
from modelyard.protos.tensors import datatype_of, to_raw
from modelyard.server.demo_models import DEMO_REPOSITORY

BOOM = textwrap.dedent('''
    from modelyard.server.types import InferResponse

    class Model:
        def execute(self, requests):
            x = requests[0].inputs["X"]
            if (x < 0).any():
                raise ValueError("negative input is not allowed")
            return [InferResponse(outputs={"Y": x * 2})]
''')
BROKEN = textwrap.dedent('''
    class Model:
        def load(self, ctx):
            raise RuntimeError("weights file is corrupt")
        def execute(self, requests):
            return []
''')
TENSOR_MODEL = textwrap.dedent('''\
    backend: python
    input: [{name: X, data_type: TYPE_FP32, dims: [2]}]
    output: [{name: Y, data_type: TYPE_FP32, dims: [2]}]
''')


@pytest.fixture(scope="module")
def server(tmp_path_factory, server_cls):
    repo: Path = tmp_path_factory.mktemp("repo")
    for name in ("add_sub", "identity", "text_sentiment_demo"):
        shutil.copytree(DEMO_REPOSITORY / name, repo / name)
    for name, code in (("boom", BOOM), ("broken", BROKEN)):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.yaml").write_text(TENSOR_MODEL)
        (repo / name / "1" / "model.py").write_text(code)
    srv = server_cls("--model-repository", str(repo), "--no-exit-on-error", "--max-message-mb", "1")
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.grpc_url)
    yield pb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def add_sub_request(a=None, b=None, **overrides) -> pb.ModelInferRequest:
    a = np.arange(4, dtype=np.float32) if a is None else a
    b = np.ones(4, dtype=np.float32) if b is None else b
    req = pb.ModelInferRequest(model_name="add_sub", **overrides)
    for name, arr in (("INPUT0", a), ("INPUT1", b)):
        req.inputs.add(name=name, datatype=datatype_of(arr), shape=arr.shape)
        req.raw_input_contents.append(to_raw(arr))
    return req


def expect(stub, request, code: grpc.StatusCode, *fragments: str, method: str = "ModelInfer") -> None:
    with pytest.raises(grpc.RpcError) as err:
        getattr(stub, method)(request, timeout=10)
    assert err.value.code() == code, err.value.details()
    for fragment in fragments:
        assert fragment in err.value.details(), err.value.details()
    assert "Traceback" not in err.value.details()
    # ... and the server keeps serving.
    ok = stub.ModelInfer(add_sub_request(), timeout=10)
    assert np.frombuffer(ok.raw_output_contents[0], "<f4").tolist() == [1.0, 2.0, 3.0, 4.0]


def test_unknown_model_is_not_found(stub):
    expect(stub, pb.ModelInferRequest(model_name="nope"), grpc.StatusCode.NOT_FOUND, "nope")


def test_unknown_version_is_not_found(stub):
    expect(stub, add_sub_request(model_version="7"), grpc.StatusCode.NOT_FOUND,
           "Request for unknown model: 'add_sub' version 7 is not found")


def test_wrong_shape(stub):
    req = add_sub_request(a=np.zeros(3, np.float32), b=np.zeros(3, np.float32))
    expect(stub, req, grpc.StatusCode.INVALID_ARGUMENT, "INPUT0", "expected shape [4]", "[3]")


def test_wrong_datatype(stub):
    req = add_sub_request(a=np.zeros(4, np.int32))
    expect(stub, req, grpc.StatusCode.INVALID_ARGUMENT, "INPUT0", "expected datatype FP32", "INT32")


def test_byte_size_mismatch(stub):
    req = add_sub_request()
    req.raw_input_contents[1] = b"\x00" * 12
    expect(stub, req, grpc.StatusCode.INVALID_ARGUMENT, "INPUT1", "needs 16 bytes, got 12")


def test_element_count_mismatch_in_typed_contents(stub):
    req = pb.ModelInferRequest(model_name="add_sub")
    for name in ("INPUT0", "INPUT1"):
        t = req.inputs.add(name=name, datatype="FP32", shape=[4])
        t.contents.fp32_contents.extend([1.0, 2.0])
    expect(stub, req, grpc.StatusCode.INVALID_ARGUMENT, "INPUT0", "needs 4 elements", "got 2")


def test_missing_input(stub):
    req = pb.ModelInferRequest(model_name="add_sub")
    req.inputs.add(name="INPUT0", datatype="FP32", shape=[4])
    req.raw_input_contents.append(to_raw(np.zeros(4, np.float32)))
    expect(stub, req, grpc.StatusCode.INVALID_ARGUMENT, "missing input 'INPUT1'")


def test_unexpected_input_name(stub):
    req = add_sub_request()
    req.inputs[1].name = "INPUTX"
    expect(stub, req, grpc.StatusCode.INVALID_ARGUMENT, "unexpected input 'INPUTX'")


def test_raw_and_input_counts_disagree(stub):
    req = add_sub_request()
    del req.raw_input_contents[1]
    expect(stub, req, grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents has 1 entries for 2 inputs")


def test_undecodable_bytes_tensor(stub):
    req = pb.ModelInferRequest(model_name="text_sentiment_demo")
    req.inputs.add(name="TEXT", datatype="BYTES", shape=[1, 1])
    req.raw_input_contents.append(struct.pack("<I", 100) + b"short")
    expect(stub, req, grpc.StatusCode.INVALID_ARGUMENT, "TEXT", "declares 100 bytes")


def test_non_utf8_text_is_invalid_argument_from_the_model(stub):
    req = pb.ModelInferRequest(model_name="text_sentiment_demo")
    req.inputs.add(name="TEXT", datatype="BYTES", shape=[1, 1])
    req.raw_input_contents.append(struct.pack("<I", 2) + b"\xff\xfe")
    expect(stub, req, grpc.StatusCode.INVALID_ARGUMENT, "TEXT", "UTF-8")


def test_batch_larger_than_max_batch_size(stub):
    req = pb.ModelInferRequest(model_name="text_sentiment_demo")
    req.inputs.add(name="TEXT", datatype="BYTES", shape=[33, 1])
    req.raw_input_contents.append(b"".join(struct.pack("<I", 1) + b"a" for _ in range(33)))
    expect(stub, req, grpc.StatusCode.INVALID_ARGUMENT, "batch size 33", "max_batch_size (32)")


def test_unknown_datatype(stub):
    req = pb.ModelInferRequest(model_name="identity")
    req.inputs.add(name="INPUT0", datatype="FP8", shape=[1])
    req.raw_input_contents.append(b"\x00")
    expect(stub, req, grpc.StatusCode.INVALID_ARGUMENT, "INPUT0", "unknown datatype 'FP8'")


def test_model_that_raises_is_internal_and_server_survives(stub):
    req = pb.ModelInferRequest(model_name="boom")
    req.inputs.add(name="X", datatype="FP32", shape=[2])
    req.raw_input_contents.append(to_raw(np.array([-1, 1], np.float32)))
    expect(stub, req, grpc.StatusCode.INTERNAL, "ValueError", "negative input is not allowed")
    req.raw_input_contents[0] = to_raw(np.array([1, 2], np.float32))
    assert np.frombuffer(stub.ModelInfer(req, timeout=10).raw_output_contents[0], "<f4").tolist() == [2.0, 4.0]


def test_model_that_failed_to_load_is_unavailable(stub):
    req = pb.ModelInferRequest(model_name="broken")
    expect(stub, req, grpc.StatusCode.UNAVAILABLE, "broken", "weights file is corrupt")


def test_oversized_message_is_resource_exhausted(stub):
    big = np.zeros(2 * 1024 * 1024 // 4, np.float32)  # 2 MiB > the 1 MiB limit of this server
    req = pb.ModelInferRequest(model_name="identity")
    req.inputs.add(name="INPUT0", datatype="FP32", shape=big.shape)
    req.raw_input_contents.append(big.tobytes())
    expect(stub, req, grpc.StatusCode.RESOURCE_EXHAUSTED)


def test_garbage_bytes_are_invalid_argument(server, stub):
    channel = grpc.insecure_channel(server.grpc_url)
    try:
        raw = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\xff\xff\xff\x07garbage", timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid inference.ModelInferRequest" in err.value.details()
    finally:
        channel.close()
    expect(stub, pb.ModelInferRequest(model_name="nope"), grpc.StatusCode.NOT_FOUND)


def test_unimplemented_rpcs(stub):
    expect(stub, pb.LogSettingsRequest(), grpc.StatusCode.UNIMPLEMENTED, "log settings", method="LogSettings")
    expect(stub, pb.TraceSettingRequest(), grpc.StatusCode.UNIMPLEMENTED, "tracing", method="TraceSetting")


def test_rest_errors_are_json_with_http_status(server):
    import json
    import urllib.error
    import urllib.request

    def post(path: str, body: bytes) -> tuple[int, dict]:
        req = urllib.request.Request(server.http_url + path, data=body, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    status, body = post("/v2/models/add_sub/infer", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]
    status, body = post("/v2/models/nope/infer", b"{}")
    assert status == 404 and "nope" in body["error"]
    good = {"inputs": [{"name": n, "shape": [4], "datatype": "FP32", "data": [1, 2, 3, 4]} for n in ("INPUT0", "INPUT1")]}
    bad = json.loads(json.dumps(good))
    bad["inputs"][0]["data"] = [1, 2]
    status, body = post("/v2/models/add_sub/infer", json.dumps(bad).encode())
    assert status == 400 and "INPUT0" in body["error"]
    status, body = post("/v2/models/add_sub/infer", json.dumps(good).encode())
    assert status == 200 and body["outputs"][0]["data"] == [2, 4, 6, 8]
