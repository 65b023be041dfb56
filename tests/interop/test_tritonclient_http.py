"""tritonclient.http (sync and aio) against a real ``modelyard serve``: every path the client has."""

from __future__ import annotations

import gzip
import json
import shutil
import urllib.request
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.http.aio as aiohttpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from modelyard.server.demo_models import DEMO_REPOSITORY

ALL_DTYPES = [
    np.bool_, np.uint8, np.uint16, np.uint32, np.uint64, np.int8, np.int16, np.int32, np.int64,
    np.float16, np.float32, np.float64,
]


@pytest.fixture(scope="module")
def client(demo_server):
    c = httpclient.InferenceServerClient(demo_server.http_url.removeprefix("http://"))
    yield c
    c.close()


def _identity(client, array: np.ndarray, *, binary_in: bool = True, binary_out: bool = True, **kwargs):
    inp = httpclient.InferInput("INPUT0", list(array.shape), np_to_triton_dtype(array.dtype))
    inp.set_data_from_numpy(array, binary_data=binary_in)
    out = httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary_out)
    return client.infer("identity", [inp], outputs=[out], **kwargs)


def _add_sub_inputs(a: np.ndarray, b: np.ndarray, binary: tuple[bool, bool] = (True, True)):
    inputs = [httpclient.InferInput("INPUT0", [4], "FP32"), httpclient.InferInput("INPUT1", [4], "FP32")]
    inputs[0].set_data_from_numpy(a, binary_data=binary[0])
    inputs[1].set_data_from_numpy(b, binary_data=binary[1])
    return inputs


def test_health_and_server_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "modelyard"
    assert {"binary_tensor_data", "system_shared_memory", "model_repository", "statistics"} <= set(meta["extensions"])
    assert client.is_model_ready("add_sub")
    assert client.is_model_ready("add_sub", "1")
    assert not client.is_model_ready("no_such_model")


def test_model_metadata_lists_protocol_datatypes_only(client):
    meta = client.get_model_metadata("add_sub")
    assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
        ("INPUT0", "FP32", [4]), ("INPUT1", "FP32", [4])]
    assert client.get_model_metadata("add_sub", "1")["versions"] == ["1"]
    for name in ("identity", "add_sub", "text_sentiment_demo", "token_stream_demo", "text_embed_demo"):
        meta = client.get_model_metadata(name)
        for tensor in meta["inputs"] + meta["outputs"]:
            assert tensor["datatype"] in {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32",
                                          "INT64", "FP16", "FP32", "FP64", "BYTES"}, (name, tensor)


def test_model_config_matches_the_grpc_one(client, demo_server):
    cfg = client.get_model_config("text_sentiment_demo")
    assert cfg["name"] == "text_sentiment_demo"
    assert cfg["max_batch_size"] == 32
    assert cfg["input"][0]["data_type"] == "TYPE_STRING"
    assert cfg["input"][0]["dims"] == [1]
    assert cfg["instance_group"][0]["kind"] == "KIND_CPU"
    assert client.get_model_config("add_sub", "1")["name"] == "add_sub"
    g = grpcclient.InferenceServerClient(demo_server.grpc_url)
    try:
        via_grpc = g.get_model_config("text_sentiment_demo", as_json=True)["config"]
    finally:
        g.close()
    assert via_grpc["name"] == cfg["name"] and via_grpc["input"][0]["name"] == cfg["input"][0]["name"]


def test_inference_statistics(client):
    before = client.get_inference_statistics("add_sub")["model_stats"][0]
    a, b = np.arange(4, dtype=np.float32), np.ones(4, dtype=np.float32)
    for _ in range(3):
        client.infer("add_sub", _add_sub_inputs(a, b))
    after = client.get_inference_statistics("add_sub", "1")["model_stats"][0]
    assert after["name"] == "add_sub" and after["version"] == "1"
    assert after["inference_stats"]["success"]["count"] == before["inference_stats"]["success"]["count"] + 3
    assert after["inference_stats"]["success"]["ns"] > 0
    every = client.get_inference_statistics()["model_stats"]
    assert {"add_sub", "identity"} <= {s["name"] for s in every}


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: np.dtype(d).name)
def test_identity_binary_both_ways_every_datatype(client, dtype):
    array = (np.random.default_rng(3).random((2, 3)) * 100).astype(dtype)
    result = _identity(client, array)
    out = result.as_numpy("OUTPUT0")
    assert out.dtype == np.dtype(dtype) and out.shape == (2, 3)
    np.testing.assert_array_equal(out, array)
    assert result.get_output("OUTPUT0")["parameters"]["binary_data_size"] == array.nbytes


def test_bytes_in_binary_form_including_empty_and_non_utf8(client):
    array = np.array([[b"hello", b""], ["héllo".encode(), b"\x00\xff\x01"]], dtype=np.object_)
    out = _identity(client, array).as_numpy("OUTPUT0")
    assert out.tolist() == array.tolist()


def test_json_only_and_mixed_json_binary(client):
    a, b = np.arange(4, dtype=np.float32), np.full(4, 2, dtype=np.float32)
    # JSON in, JSON out
    result = client.infer("add_sub", _add_sub_inputs(a, b, (False, False)),
                          outputs=[httpclient.InferRequestedOutput("OUTPUT0", binary_data=False),
                                   httpclient.InferRequestedOutput("OUTPUT1", binary_data=False)])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    assert "data" in result.get_output("OUTPUT1")
    # one input binary, one JSON; one output binary, one JSON
    result = client.infer("add_sub", _add_sub_inputs(a, b, (False, True)), request_id="mixed-1",
                          outputs=[httpclient.InferRequestedOutput("OUTPUT0", binary_data=True),
                                   httpclient.InferRequestedOutput("OUTPUT1", binary_data=False)])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    assert "binary_data_size" in result.get_output("OUTPUT0")["parameters"]
    assert result.get_output("OUTPUT1")["data"] == (a - b).tolist()
    assert result.get_response()["id"] == "mixed-1"
    # no outputs named: the client asks for binary_data_output
    result = client.infer("add_sub", _add_sub_inputs(a, b))
    assert "binary_data_size" in result.get_output("OUTPUT1")["parameters"]


def test_bytes_in_json_form(client):
    text = httpclient.InferInput("TEXT", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([["a great and happy day"]], dtype=np.object_), binary_data=False)
    result = client.infer("text_sentiment_demo", [text])
    assert result.as_numpy("LABEL").reshape(-1)[0] == b"positive"


@pytest.mark.parametrize("request_alg", [None, "gzip", "deflate"])
@pytest.mark.parametrize("response_alg", [None, "gzip", "deflate"])
def test_compression_both_ways(client, request_alg, response_alg):
    array = np.arange(4096, dtype=np.float32).reshape(64, 64)
    result = _identity(client, array, request_compression_algorithm=request_alg,
                       response_compression_algorithm=response_alg)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), array)


def test_responses_are_really_compressed(demo_server):
    body = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "INT32", "shape": [1000],
                                   "data": list(range(1000))}]}).encode()
    for encoding, decode in (("gzip", gzip.decompress), ("deflate", zlib.decompress)):
        req = urllib.request.Request(demo_server.http_url + "/v2/models/identity/infer", data=body,
                                     headers={"Accept-Encoding": encoding})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.headers["Content-Encoding"] == encoding
            doc = json.loads(decode(resp.read()))
        assert doc["outputs"][0]["data"] == list(range(1000))


def test_classification_extension(client, demo_server):
    a = np.array([0.5, 3.0, 1.0, 2.0], dtype=np.float32)
    b = np.zeros(4, dtype=np.float32)
    result = client.infer("add_sub", _add_sub_inputs(a, b),
                          outputs=[httpclient.InferRequestedOutput("OUTPUT0", class_count=2)])
    assert result.as_numpy("OUTPUT0").tolist() == [b"3.000000:1", b"2.000000:3"]
    g = grpcclient.InferenceServerClient(demo_server.grpc_url)
    try:
        inputs = [grpcclient.InferInput("INPUT0", [4], "FP32"), grpcclient.InferInput("INPUT1", [4], "FP32")]
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(b)
        result = g.infer("add_sub", inputs, outputs=[grpcclient.InferRequestedOutput("OUTPUT1", class_count=1)])
        assert result.as_numpy("OUTPUT1").tolist() == [b"3.000000:1"]
    finally:
        g.close()


def test_errors_carry_the_http_status_and_message(client):
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("no_such_model")
    assert err.value.status() == "404" and "no_such_model" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.get_model_config("add_sub", "7")
    assert err.value.status() == "404" and "version 7 is not found" in err.value.message()
    bad = [httpclient.InferInput("INPUT0", [3], "FP32"), httpclient.InferInput("INPUT1", [3], "FP32")]
    for t in bad:
        t.set_data_from_numpy(np.zeros(3, np.float32))
    with pytest.raises(InferenceServerException) as err:
        client.infer("add_sub", bad)
    assert err.value.status() == "400" and "INPUT0" in err.value.message() and "[4]" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.get_trace_settings()
    assert err.value.status() == "501"
    assert client.get_cuda_shared_memory_status() == []
    # ... and it keeps serving
    assert client.is_server_ready()


def test_unknown_route_is_a_json_error(demo_server):
    try:
        urllib.request.urlopen(demo_server.http_url + "/v2/no/such/route", timeout=10)
    except urllib.error.HTTPError as exc:
        assert exc.code == 404 and "no route" in json.loads(exc.read())["error"]
    else:
        raise AssertionError("expected 404")


def test_repository_index_load_and_unload(start_server, tmp_path: Path):
    repo = tmp_path / "repo"
    for name in ("add_sub", "identity"):
        shutil.copytree(DEMO_REPOSITORY / name, repo / name)
    server = start_server("--model-repository", str(repo), "--model", "identity")
    c = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))
    try:
        index = {m["name"]: m for m in c.get_model_repository_index()}
        assert index["identity"]["state"] == "READY" and index["add_sub"]["state"] == "UNAVAILABLE"
        c.load_model("add_sub")
        assert c.is_model_ready("add_sub")
        c.unload_model("add_sub")
        assert not c.is_model_ready("add_sub")
        with pytest.raises(InferenceServerException) as err:
            c.load_model("../etc")
        # "..%2Fetc" never names a model: refused by the name check (400) or by routing (404), as JSON
        assert err.value.status() in ("400", "404"), err.value.message()
        with pytest.raises(InferenceServerException) as err:
            c.load_model("..")
        assert err.value.status() in ("400", "404"), err.value.message()
        with pytest.raises(InferenceServerException) as err:
            c.load_model("add_sub", config='{"backend": python}')  # not JSON
        assert err.value.status() == "400" and "failed to load" in err.value.message()
        assert c.is_model_ready("identity")
    finally:
        c.close()


async def test_aio_client(demo_server):
    c = aiohttpclient.InferenceServerClient(demo_server.http_url.removeprefix("http://"))
    try:
        assert await c.is_server_live() and await c.is_server_ready()
        assert await c.is_model_ready("identity")
        assert (await c.get_server_metadata())["name"] == "modelyard"
        assert (await c.get_model_metadata("add_sub"))["inputs"][0]["datatype"] == "FP32"
        assert (await c.get_model_config("add_sub"))["name"] == "add_sub"
        assert (await c.get_inference_statistics("add_sub"))["model_stats"][0]["name"] == "add_sub"
        assert any(m["name"] == "identity" for m in await c.get_model_repository_index())
        array = np.arange(2048, dtype=np.int64).reshape(2, 1024)
        for alg in (None, "gzip", "deflate"):
            inp = aiohttpclient.InferInput("INPUT0", list(array.shape), "INT64")
            inp.set_data_from_numpy(array)
            result = await c.infer("identity", [inp], request_compression_algorithm=alg,
                                   response_compression_algorithm=alg)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), array)
        with pytest.raises(InferenceServerException) as err:
            await c.get_model_metadata("no_such_model")
        assert err.value.status() == "404"
        assert await c.get_system_shared_memory_status() == []
    finally:
        await c.close()


# ---------------------------------------------------------------------- system shared memory


@pytest.fixture
def regions():
    made: list = []

    def make(byte_size: int):
        key = f"/modelyard_test_{uuid.uuid4().hex[:12]}"
        handle = shm.create_shared_memory_region(key.strip("/"), key, byte_size)
        made.append(handle)
        return key, handle

    yield make
    for handle in made:
        shm.destroy_shared_memory_region(handle)


def test_system_shared_memory_over_http(client, regions):
    array = np.arange(1024, dtype=np.float32).reshape(32, 32)
    in_key, in_handle = regions(array.nbytes)
    out_key, out_handle = regions(array.nbytes + 64)
    shm.set_shared_memory_region(in_handle, [array])
    client.unregister_system_shared_memory()
    client.register_system_shared_memory("in_region", in_key, array.nbytes)
    client.register_system_shared_memory("out_region", out_key, array.nbytes, offset=64)
    try:
        status = {r["name"]: r for r in client.get_system_shared_memory_status()}
        assert status["out_region"] == {"name": "out_region", "key": out_key, "offset": 64, "byte_size": array.nbytes}
        assert client.get_system_shared_memory_status("in_region")[0]["key"] == in_key
        inp = httpclient.InferInput("INPUT0", [32, 32], "FP32")
        inp.set_shared_memory("in_region", array.nbytes)
        out = httpclient.InferRequestedOutput("OUTPUT0")
        out.set_shared_memory("out_region", array.nbytes)
        result = client.infer("identity", [inp], outputs=[out])
        meta = result.get_output("OUTPUT0")
        assert meta["shape"] == [32, 32] and meta["datatype"] == "FP32"
        got = shm.get_contents_as_numpy(out_handle, np.float32, [32, 32], offset=64)
        np.testing.assert_array_equal(got, array)
        with pytest.raises(InferenceServerException) as err:
            client.register_system_shared_memory("in_region", in_key, array.nbytes)
        assert err.value.status() == "409"
    finally:
        client.unregister_system_shared_memory("in_region")
        client.unregister_system_shared_memory()
    assert client.get_system_shared_memory_status() == []


def test_system_shared_memory_over_grpc_and_mixed_with_raw_inputs(demo_server, regions):
    a, b = np.arange(4, dtype=np.float32), np.full(4, 10, dtype=np.float32)
    in_key, in_handle = regions(64)
    out_key, out_handle = regions(64)
    shm.set_shared_memory_region(in_handle, [b], offset=16)
    g = grpcclient.InferenceServerClient(demo_server.grpc_url)
    try:
        g.register_system_shared_memory("g_in", in_key, 64)
        g.register_system_shared_memory("g_out", out_key, 64)
        status = g.get_system_shared_memory_status(as_json=True)["regions"]
        assert set(status) >= {"g_in", "g_out"}
        inputs = [grpcclient.InferInput("INPUT0", [4], "FP32"), grpcclient.InferInput("INPUT1", [4], "FP32")]
        inputs[0].set_data_from_numpy(a)                    # raw_input_contents
        inputs[1].set_shared_memory("g_in", 16, offset=16)  # shared memory
        outs = [grpcclient.InferRequestedOutput("OUTPUT0"), grpcclient.InferRequestedOutput("OUTPUT1")]
        outs[1].set_shared_memory("g_out", 16, offset=8)
        result = g.infer("add_sub", inputs, outputs=outs)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
        np.testing.assert_array_equal(shm.get_contents_as_numpy(out_handle, np.float32, [4], offset=8), a - b)
        # a region registered over gRPC is usable over REST too
        h = httpclient.InferenceServerClient(demo_server.http_url.removeprefix("http://"))
        try:
            assert {r["name"] for r in h.get_system_shared_memory_status()} >= {"g_in", "g_out"}
        finally:
            h.close()
    finally:
        g.unregister_system_shared_memory()
        g.close()
