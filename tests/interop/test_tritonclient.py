"""Triton's own Python client against a real ``modelyard serve`` process: the wire-compatibility judge."""

from __future__ import annotations

import queue
import shutil
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from modelyard.server.demo_models import DEMO_REPOSITORY

ALL_DTYPES = [
    np.bool_, np.uint8, np.uint16, np.uint32, np.uint64, np.int8, np.int16, np.int32, np.int64,
    np.float16, np.float32, np.float64,
]


@pytest.fixture(scope="module")
def client(demo_server):
    c = grpcclient.InferenceServerClient(demo_server.grpc_url)
    yield c
    c.close()


def _infer_identity(client, array: np.ndarray):
    inp = grpcclient.InferInput("INPUT0", list(array.shape), np_to_triton_dtype(array.dtype))
    inp.set_data_from_numpy(array)
    return client.infer("identity", [inp], outputs=[grpcclient.InferRequestedOutput("OUTPUT0")])


def test_server_live_ready_and_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "modelyard"
    assert "model_repository" in meta["extensions"]
    assert client.is_model_ready("add_sub")
    assert not client.is_model_ready("no_such_model")


def test_model_metadata_and_config(client):
    meta = client.get_model_metadata("add_sub", as_json=True)
    assert meta["name"] == "add_sub"
    assert meta["versions"] == ["1"]
    assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
        ("INPUT0", "FP32", ["4"]), ("INPUT1", "FP32", ["4"])
    ]
    cfg = client.get_model_config("text_sentiment_demo", as_json=True)["config"]
    assert cfg["name"] == "text_sentiment_demo"
    assert cfg["max_batch_size"] == 32
    assert cfg["input"][0]["data_type"] == "TYPE_STRING"
    assert cfg["instance_group"][0]["kind"] == "KIND_CPU"


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: np.dtype(d).name)
def test_identity_roundtrips_every_datatype(client, dtype):
    rng = np.random.default_rng(7)
    array = (rng.random((2, 3)) * 100).astype(dtype)
    result = _infer_identity(client, array)
    out = result.as_numpy("OUTPUT0")
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, array)
    assert result.get_output("OUTPUT0").datatype == np_to_triton_dtype(np.dtype(dtype))


def test_identity_roundtrips_bytes_including_empty_and_binary(client):
    array = np.array([[b"hello", b""], ["héllo".encode(), b"\x00\xff\x01"]], dtype=np.object_)
    out = _infer_identity(client, array).as_numpy("OUTPUT0")
    assert out.shape == (2, 2)
    assert out.tolist() == array.tolist()


def test_add_sub(client):
    a = np.arange(4, dtype=np.float32)
    b = np.ones(4, dtype=np.float32)
    inputs = [grpcclient.InferInput("INPUT0", [4], "FP32"), grpcclient.InferInput("INPUT1", [4], "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = client.infer("add_sub", inputs, request_id="req-42")
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    assert result.get_response().id == "req-42"
    # A requested subset of outputs is honoured.
    only = client.infer("add_sub", inputs, outputs=[grpcclient.InferRequestedOutput("OUTPUT1")])
    assert only.as_numpy("OUTPUT0") is None
    np.testing.assert_array_equal(only.as_numpy("OUTPUT1"), a - b)


def test_async_stream_infer_on_a_streaming_model(demo_server):
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(demo_server.grpc_url)
    try:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        text = grpcclient.InferInput("TEXT", [1], "BYTES")
        text.set_data_from_numpy(np.array([b"the quick brown fox"], dtype=np.object_))
        client.async_stream_infer("token_stream_demo", [text], request_id="s1")
        tokens = []
        for _ in range(4):
            result, error = results.get(timeout=10)
            assert error is None, error
            tokens.append(result.as_numpy("TOKEN")[0])
            final = result.get_response().parameters["triton_final_response"].bool_param
            assert final == (len(tokens) == 4)
        assert tokens == [b"the", b"quick", b"brown", b"fox"]
        # An error inside the stream comes back in-band and the stream goes on.
        client.async_stream_infer("no_such_model", [text])
        _, error = results.get(timeout=10)
        assert error is not None and "no_such_model" in str(error)
        client.async_stream_infer("token_stream_demo", [text])
        result, error = results.get(timeout=10)
        assert error is None and result.as_numpy("TOKEN")[0] == b"the"
    finally:
        client.stop_stream()
        client.close()


def test_inference_statistics_count_requests(client):
    before = client.get_inference_statistics("add_sub", as_json=True)["model_stats"][0]
    inputs = [grpcclient.InferInput("INPUT0", [4], "FP32"), grpcclient.InferInput("INPUT1", [4], "FP32")]
    for inp in inputs:
        inp.set_data_from_numpy(np.ones(4, dtype=np.float32))
    for _ in range(3):
        client.infer("add_sub", inputs)
    after = client.get_inference_statistics("add_sub", as_json=True)["model_stats"][0]
    success_before = int(before["inference_stats"]["success"].get("count", 0))
    assert int(after["inference_stats"]["success"]["count"]) == success_before + 3
    assert int(after["inference_stats"]["success"]["ns"]) > 0
    assert int(after["execution_count"]) >= 3
    assert after["name"] == "add_sub" and after["version"] == "1"


def test_repository_index_load_and_unload(start_server, tmp_path: Path):
    repo = tmp_path / "repo"
    shutil.copytree(DEMO_REPOSITORY / "add_sub", repo / "add_sub")
    shutil.copytree(DEMO_REPOSITORY / "identity", repo / "identity")
    server = start_server("--model-repository", str(repo), "--model", "identity")
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
        assert index["identity"]["state"] == "READY"
        assert index["add_sub"].get("state") == "UNAVAILABLE"
        assert not client.is_model_ready("add_sub")

        client.load_model("add_sub")
        assert client.is_model_ready("add_sub")
        # Reload (load again) keeps serving.
        client.load_model("add_sub")
        assert client.is_model_ready("add_sub")

        client.unload_model("add_sub")
        assert not client.is_model_ready("add_sub")
        with pytest.raises(InferenceServerException) as err:
            client.load_model("../etc")
        assert "invalid model name" in str(err.value)
        with pytest.raises(InferenceServerException) as err:
            client.load_model("missing_model")
        assert "failed to load 'missing_model'" in err.value.message()  # Triton's wording
        assert client.is_model_ready("identity")
    finally:
        client.close()
