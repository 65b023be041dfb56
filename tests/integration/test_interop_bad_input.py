"""Malformed binary headers, encodings and shared memory requests: the right 4xx / INVALID_ARGUMENT naming
the field, never a crash or a read outside a region; the server keeps serving after each."""

from __future__ import annotations

import gzip
import json
import os
import struct
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest

from modelyard.protos import grpc_service_pb2 as pb
from modelyard.protos import grpc_service_pb2_grpc as pb_grpc

SHM = Path("/dev/shm")


@pytest.fixture(scope="module")
def server(server_cls):
    srv = server_cls("--max-message-mb", "1")
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.grpc_url)
    yield pb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


@pytest.fixture
def shm_file():
    """``make(size) -> key``: a /dev/shm object of ``size`` bytes, removed at teardown."""
    made: list[Path] = []

    def make(size: int, data: bytes = b"") -> str:
        name = f"modelyard_bad_{uuid.uuid4().hex[:12]}"
        path = SHM / name
        with open(path, "wb") as f:
            f.write(data.ljust(size, b"\0"))
        made.append(path)
        return "/" + name

    yield make
    for path in made:
        path.unlink(missing_ok=True)


def post(server, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(server.http_url + path, data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def get(server, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(server.http_url + path, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def still_serving(server) -> None:
    status, body = post(server, "/v2/models/identity/infer", json.dumps(
        {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [2], "data": [1, 2]}]}).encode())
    assert status == 200 and body["outputs"][0]["data"] == [1.0, 2.0]


def expect(server, path: str, body: bytes, status: int, *fragments: str, headers: dict[str, str] | None = None):
    got, doc = post(server, path, body, headers)
    assert got == status, doc
    for fragment in fragments:
        assert fragment in doc["error"], doc["error"]
    still_serving(server)


def binary_request(inputs: list[dict], binary: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps({"inputs": inputs}).encode()
    return head + binary, {"Inference-Header-Content-Length": str(len(head))}


FP32_4 = {"name": "INPUT0", "datatype": "FP32", "shape": [4], "parameters": {"binary_data_size": 16}}
INFER = "/v2/models/identity/infer"


@pytest.mark.parametrize("value,fragment", [
    ("abc", "must be a non-negative integer"), ("-5", "must be a non-negative integer"),
    ("1e3", "must be a non-negative integer"), ("", "must be a non-negative integer"),
    ("999999", "past the end"),
])
def test_malformed_inference_header_length(server, value, fragment):
    body, _ = binary_request([FP32_4], b"\0" * 16)
    expect(server, INFER, body, 400, "Inference-Header-Content-Length", fragment,
           headers={"Inference-Header-Content-Length": value})


def test_binary_data_size_past_the_body(server):
    body, headers = binary_request([FP32_4], b"\0" * 8)
    expect(server, INFER, body, 400, "INPUT0", "binary_data_size 16 is past the end", headers=headers)


def test_bytes_after_the_binary_inputs(server):
    body, headers = binary_request([FP32_4], b"\0" * 20)
    expect(server, INFER, body, 400, "4 bytes of binary data follow", headers=headers)


def test_negative_binary_data_size(server):
    entry = {**FP32_4, "parameters": {"binary_data_size": -4}}
    body, headers = binary_request([entry], b"")
    expect(server, INFER, body, 400, "INPUT0", "binary_data_size must be a non-negative integer", headers=headers)


def test_binary_bytes_tensor_with_a_bad_length_prefix(server):
    raw = struct.pack("<I", 100) + b"short"
    entry = {"name": "INPUT0", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(raw)}}
    body, headers = binary_request([entry], raw)
    expect(server, INFER, body, 400, "INPUT0", "declares 100 bytes", headers=headers)


def test_data_and_binary_both_set(server):
    entry = {**FP32_4, "data": [1, 2, 3, 4]}
    body, headers = binary_request([entry], b"\0" * 16)
    expect(server, INFER, body, 400, "INPUT0", "both set", headers=headers)


@pytest.mark.parametrize("encoding", ["br", "compress", "x-unknown"])
def test_unknown_content_encoding_is_415(server, encoding):
    expect(server, INFER, b"\x00\x01", 415, "Content-Encoding", encoding, headers={"Content-Encoding": encoding})


def test_corrupt_and_truncated_gzip(server):
    expect(server, INFER, b"not gzip at all", 400, "not valid gzip", headers={"Content-Encoding": "gzip"})
    whole = gzip.compress(json.dumps({"inputs": []}).encode())
    expect(server, INFER, whole[:-12], 400, "gzip", headers={"Content-Encoding": "gzip"})
    expect(server, INFER, b"\x78\x9c garbage", 400, "deflate", headers={"Content-Encoding": "deflate"})


def test_decompression_bomb_is_413(server):
    bomb = gzip.compress(b"\0" * (8 * 1024 * 1024))  # 8 MiB of zeros > the 1 MiB limit, ~8 KiB compressed
    expect(server, INFER, bomb, 413, "decompresses to more than", headers={"Content-Encoding": "gzip"})


def test_body_over_the_limit_is_413_json(server):
    expect(server, INFER, b"x" * (2 * 1024 * 1024), 413, "--max-message-mb")


# ---------------------------------------------------------------------- shared memory over REST


def shm_input(region: str, size: int, offset: int | None = None, shape=(4,)) -> bytes:
    params: dict = {"shared_memory_region": region, "shared_memory_byte_size": size}
    if offset is not None:
        params["shared_memory_offset"] = offset
    return json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": list(shape),
                                   "parameters": params}]}).encode()


def register(server, name: str, key: str, byte_size: int, offset: int = 0) -> tuple[int, dict]:
    return post(server, f"/v2/systemsharedmemory/region/{name}/register",
                json.dumps({"key": key, "offset": offset, "byte_size": byte_size}).encode())


def test_region_that_does_not_exist(server):
    expect(server, INFER, shm_input("nowhere", 16), 400, "INPUT0", "shared_memory_region 'nowhere' is not registered")
    body = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1], "data": [1]}],
                       "outputs": [{"name": "OUTPUT0", "parameters": {"shared_memory_region": "nowhere",
                                                                       "shared_memory_byte_size": 4}}]}).encode()
    expect(server, INFER, body, 400, "OUTPUT0", "'nowhere' is not registered")
    status, doc = get(server, "/v2/systemsharedmemory/region/nowhere/status")
    assert status == 404 and "nowhere" in doc["error"]


def test_offsets_and_sizes_outside_the_region(server, shm_file):
    key = shm_file(64, np.arange(16, dtype=np.float32).tobytes())
    assert register(server, "r64", key, 32, offset=16)[0] == 200
    try:
        # inside: floats 4..7 (the region starts 16 bytes into the object)
        status, doc = post(server, INFER, shm_input("r64", 16, 0))
        assert status == 200 and doc["outputs"][0]["data"] == [4.0, 5.0, 6.0, 7.0]
        expect(server, INFER, shm_input("r64", 16, 24), 400, "INPUT0", "shared_memory_offset 24",
               "exceeds region 'r64' (32 bytes)")
        expect(server, INFER, shm_input("r64", 16, 10**12), 400, "INPUT0", "exceeds region")
        expect(server, INFER, shm_input("r64", 64, 0, shape=(16,)), 400, "INPUT0", "shared_memory_byte_size 64")
        expect(server, INFER, shm_input("r64", 16, -4), 400, "shared_memory_offset must be >= 0")
        # a byte size that does not fit the tensor
        expect(server, INFER, shm_input("r64", 12, 0), 400, "INPUT0", "needs 16 bytes, got 12")
        # an output larger than the space the client set aside for it
        body = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [4], "data": [1, 2, 3, 4]}],
                           "outputs": [{"name": "OUTPUT0", "parameters": {"shared_memory_region": "r64",
                                                                           "shared_memory_byte_size": 8}}]}).encode()
        expect(server, INFER, body, 400, "OUTPUT0", "needs 16 bytes but shared_memory_byte_size is 8")
    finally:
        post(server, "/v2/systemsharedmemory/region/r64/unregister", b"")


def test_region_of_the_wrong_size_or_key(server, shm_file):
    key = shm_file(32)
    status, doc = register(server, "big", key, 64)
    assert status == 400 and "exceeds the 32 bytes" in doc["error"]
    status, doc = register(server, "shifted", key, 32, offset=8)
    assert status == 400 and "offset 8 + byte_size 32" in doc["error"]
    for bad_key, fragment in (("/../../etc/passwd", "invalid shared memory key"), ("a/b", "invalid shared memory key"),
                              ("/", "invalid shared memory key"), ("/modelyard_no_such_key", "does not exist")):
        status, doc = register(server, "k", bad_key, 16)
        assert status == 400 and fragment in doc["error"], doc
    status, doc = register(server, "zero", key, 0)
    assert status == 400 and "byte_size must be >= 1" in doc["error"]
    status, doc = post(server, "/v2/systemsharedmemory/region/nokey/register", json.dumps({"byte_size": 4}).encode())
    assert status == 400 and "'key' is required" in doc["error"]
    assert register(server, "dup", key, 16)[0] == 200
    try:
        status, doc = register(server, "dup", key, 16)
        assert status == 409 and "already registered" in doc["error"]
    finally:
        post(server, "/v2/systemsharedmemory/region/dup/unregister", b"")
    still_serving(server)


def test_region_that_shrank_after_registration_is_refused_not_a_crash(server, shm_file):
    key = shm_file(4096)
    assert register(server, "shrinks", key, 4096)[0] == 200
    try:
        os.truncate(SHM / key.lstrip("/"), 16)
        expect(server, INFER, shm_input("shrinks", 16, 2048), 400, "shrank")
    finally:
        post(server, "/v2/systemsharedmemory/region/shrinks/unregister", b"")


# ---------------------------------------------------------------------- gRPC


def grpc_expect(stub, method: str, request, code: grpc.StatusCode, *fragments: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        getattr(stub, method)(request, timeout=10)
    assert err.value.code() == code, err.value.details()
    for fragment in fragments:
        assert fragment in err.value.details(), err.value.details()
    ok = stub.ServerReady(pb.ServerReadyRequest(), timeout=10)
    assert ok.ready


def test_raw_and_typed_contents_together_are_invalid_argument(stub):
    req = pb.ModelInferRequest(model_name="identity")
    t = req.inputs.add(name="INPUT0", datatype="FP32", shape=[2])
    t.contents.fp32_contents.extend([1.0, 2.0])
    req.raw_input_contents.append(np.zeros(2, np.float32).tobytes())
    grpc_expect(stub, "ModelInfer", req, grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents", "contents")


def test_grpc_shared_memory_errors(stub, shm_file):
    req = pb.ModelInferRequest(model_name="identity")
    t = req.inputs.add(name="INPUT0", datatype="FP32", shape=[4])
    t.parameters["shared_memory_region"].string_param = "nowhere"
    t.parameters["shared_memory_byte_size"].int64_param = 16
    grpc_expect(stub, "ModelInfer", req, grpc.StatusCode.INVALID_ARGUMENT, "INPUT0", "'nowhere' is not registered")
    key = shm_file(32)
    grpc_expect(stub, "SystemSharedMemoryRegister", pb.SystemSharedMemoryRegisterRequest(
        name="g", key="/../etc/passwd", byte_size=8), grpc.StatusCode.INVALID_ARGUMENT, "invalid shared memory key")
    grpc_expect(stub, "SystemSharedMemoryRegister", pb.SystemSharedMemoryRegisterRequest(
        name="g", key=key, byte_size=64), grpc.StatusCode.INVALID_ARGUMENT, "exceeds the 32 bytes")
    stub.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(name="g", key=key, byte_size=32), timeout=10)
    try:
        grpc_expect(stub, "SystemSharedMemoryRegister", pb.SystemSharedMemoryRegisterRequest(
            name="g", key=key, byte_size=32), grpc.StatusCode.ALREADY_EXISTS, "already registered")
        t.parameters["shared_memory_region"].string_param = "g"
        t.parameters["shared_memory_offset"].int64_param = 24
        grpc_expect(stub, "ModelInfer", req, grpc.StatusCode.INVALID_ARGUMENT, "INPUT0", "shared_memory_offset 24",
                    "exceeds region 'g'")
        t.contents.fp32_contents.extend([1, 2, 3, 4])
        grpc_expect(stub, "ModelInfer", req, grpc.StatusCode.INVALID_ARGUMENT, "both shared_memory_region and contents")
    finally:
        stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="g"), timeout=10)
    grpc_expect(stub, "SystemSharedMemoryStatus", pb.SystemSharedMemoryStatusRequest(name="g"),
                grpc.StatusCode.NOT_FOUND, "'g' is not registered")
