"""examples/triton-client-examples-client-examples/model_repository (the models Triton's client examples expect, as python models) loads
in ``modelyard serve`` and answers what those examples check, through tritonclient."""

from __future__ import annotations

import io
import queue
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

REPOSITORY = Path(__file__).resolve().parents[2] / "examples" / "triton-client-examples" / "model_repository"
VALUES = [11, 7, 5, 3, 2, 0, 1]


@pytest.fixture(scope="module")
def server(server_cls):
    srv = server_cls("--model-repository", str(REPOSITORY))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server):
    with grpcclient.InferenceServerClient(server.grpc_url.split("://")[-1]) as c:
        yield c


@pytest.fixture(scope="module")
def http_client(server):
    c = httpclient.InferenceServerClient(server.http_url.split("://")[-1])
    yield c
    c.close()


def _tensor(mod, name: str, array: np.ndarray, datatype: str):  # type: ignore[no-untyped-def]
    t = mod.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array)
    return t


def test_every_model_is_ready(client):
    names = {m.name for m in client.get_model_repository_index().models}
    assert names == {p.name for p in REPOSITORY.iterdir() if (p / "config.yaml").is_file()}
    for name in names:
        assert client.is_model_ready(name), name


@pytest.mark.parametrize("model,datatype,dtype", [("simple", "INT32", np.int32), ("simple_int8", "INT8", np.int8)])
def test_simple_sum_and_difference(client, model, datatype, dtype):
    a = np.arange(16, dtype=dtype).reshape(1, 16)
    b = np.ones((1, 16), dtype=dtype)
    r = client.infer(model, [_tensor(grpcclient, "INPUT0", a, datatype), _tensor(grpcclient, "INPUT1", b, datatype)])
    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), a - b)
    assert r.as_numpy("OUTPUT0").dtype == dtype


def test_simple_string_over_http(http_client):
    a = np.array([[str(i).encode() for i in range(16)]], dtype=object)
    b = np.array([[b"1"] * 16], dtype=object)
    r = http_client.infer("simple_string", [_tensor(httpclient, "INPUT0", a, "BYTES"),
                                            _tensor(httpclient, "INPUT1", b, "BYTES")])
    assert [int(x) for x in r.as_numpy("OUTPUT0")[0]] == [i + 1 for i in range(16)]
    assert [int(x) for x in r.as_numpy("OUTPUT1")[0]] == [i - 1 for i in range(16)]


def test_simple_identity_keeps_embedded_nul(client):
    data = np.array([[b"he\x00llo"] * 16], dtype=object)
    r = client.infer("simple_identity", [_tensor(grpcclient, "INPUT0", data, "BYTES")])
    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), data)


def _sequence(client, model: str, seq_id, values: list[int]) -> list[int]:  # type: ignore[no-untyped-def]
    out = []
    for i, v in enumerate(values):
        r = client.infer(model, [_tensor(grpcclient, "INPUT", np.full((1, 1), v, np.int32), "INT32")],
                         sequence_id=seq_id, sequence_start=i == 0, sequence_end=i == len(values) - 1)
        out.append(int(r.as_numpy("OUTPUT")[0][0]))
    return out


def test_simple_sequence_start_adds_one(client):
    # a string correlation ID, as the examples send without --dyna
    assert _sequence(client, "simple_sequence", "a5b2c3d4-0000-4000-8000-000000000001", [20, *VALUES]) == \
        [21, *VALUES]


def test_simple_dyna_sequence_adds_the_correlation_id_at_the_end(client):
    assert _sequence(client, "simple_dyna_sequence", 1000, [0, *VALUES]) == [1, *VALUES[:-1], VALUES[-1] + 1000]


def test_simple_string_dyna_sequence_accumulates(client):
    got = _sequence(client, "simple_string_dyna_sequence", "1002", [20, *(-v for v in VALUES)])
    expected = list(np.cumsum([20, *(-v for v in VALUES)]))
    expected[-1] += 1002
    assert got == expected


def test_repeat_int32_streams_one_response_per_element(client):
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=partial(lambda q, result, error: q.put(error or result), responses))
    try:
        values = np.arange(100, 104, dtype=np.int32)
        client.async_stream_infer("repeat_int32", [
            _tensor(grpcclient, "IN", values, "INT32"),
            _tensor(grpcclient, "DELAY", np.full(4, 10, np.uint32), "UINT32"),
            _tensor(grpcclient, "WAIT", np.array([10], np.uint32), "UINT32"),
        ], outputs=[grpcclient.InferRequestedOutput("OUT")])
        got = []
        for _ in values:
            item = responses.get(timeout=30)
            assert not isinstance(item, Exception), item
            got.append(int(item.as_numpy("OUT")[0]))
        assert got == list(values)
    finally:
        client.stop_stream()


def test_custom_identity_int32(http_client):
    data = np.arange(16, dtype=np.int32).reshape(1, 16)
    r = http_client.infer("custom_identity_int32", [_tensor(httpclient, "INPUT0", data, "INT32")])
    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), data)


def test_image_ensemble_classifies(client):
    image_module = pytest.importorskip("PIL.Image")
    buf = io.BytesIO()
    image_module.fromarray(np.full((40, 60, 3), 128, np.uint8)).save(buf, format="PNG")
    data = np.array([[buf.getvalue()]], dtype=object)
    r = client.infer("preprocess_inception_ensemble", [_tensor(grpcclient, "INPUT", data, "BYTES")],
                     outputs=[grpcclient.InferRequestedOutput("OUTPUT", class_count=3)])
    top = r.as_numpy("OUTPUT")
    assert top.shape == (1, 3)
    value, index = top[0][0].decode().split(":")[:2]
    assert 0.0 < float(value) <= 1.0 and 0 <= int(index) < 1001
