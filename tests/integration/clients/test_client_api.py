"""InferenceClient and AsyncInferenceClient against a real server."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from modelyard.clients import AsyncInferenceClient, InferenceClient, InferenceServerError
from modelyard.launcher import Endpoints
from modelyard.protos.tensors import as_bytes_array

ROUND_TRIP = [
    np.array([1.5, -2.25, 3.0], dtype=np.float16),
    np.arange(6, dtype=np.float32).reshape(2, 3),
    np.array([[1, -2], [3, 2**40]], dtype=np.int64),
    np.array([0, 255], dtype=np.uint8),
    np.array([True, False, True]),
    as_bytes_array(["héllo", "", "wörld\x00bin"], [3, 1]),
]


@pytest.mark.parametrize("array", ROUND_TRIP, ids=lambda a: f"{a.dtype}{list(a.shape)}")
def test_sync_identity_round_trips_dtypes(server: Endpoints, array: np.ndarray) -> None:
    with InferenceClient(server.grpc) as client:
        result = client.infer("identity", {"INPUT0": array}, request_id="req-1")
    out = result["OUTPUT0"]
    assert result.id == "req-1" and result.model == "identity" and result.version == "1"
    assert out.dtype == array.dtype and out.shape == array.shape
    assert out.tolist() == array.tolist()


async def test_async_identity_round_trips_dtypes(server: Endpoints) -> None:
    async with AsyncInferenceClient(server.grpc) as client:
        for array in ROUND_TRIP:
            out = (await client.infer("identity", {"INPUT0": array}))["OUTPUT0"]
            assert out.dtype == array.dtype and out.tolist() == array.tolist()


def test_add_sub_and_requested_outputs(server: Endpoints) -> None:
    a, b = np.array([1, 2, 3, 4], np.float32), np.array([4, 3, 2, 1], np.float32)
    with InferenceClient(server.grpc) as client:
        both = client.infer("add_sub", {"INPUT0": a, "INPUT1": b})
        only = client.infer("add_sub", {"INPUT0": a, "INPUT1": b}, outputs=["OUTPUT1"])
    np.testing.assert_array_equal(both["OUTPUT0"], a + b)
    np.testing.assert_array_equal(both["OUTPUT1"], a - b)
    assert list(only.outputs) == ["OUTPUT1"]


def test_sync_stream_yields_one_result_per_token(server: Endpoints) -> None:
    with InferenceClient(server.grpc) as client:
        results = list(client.stream_infer("token_stream_demo", {"TEXT": as_bytes_array(["one two three"])}))
    assert [r["TOKEN"].tolist() for r in results] == [[b"one"], [b"two"], [b"three"]]
    assert [int(r["INDEX"][0]) for r in results] == [0, 1, 2]
    assert [r.final for r in results] == [False, False, True]


async def test_async_stream_yields_tokens_and_stops_early(server: Endpoints) -> None:
    async with AsyncInferenceClient(server.grpc) as client:
        tokens = [r["TOKEN"][0] async for r in client.stream_infer("token_stream_demo", {"TEXT": as_bytes_array(["a b"])})]
        assert tokens == [b"a", b"b"]
        stream = client.stream_infer(
            "token_stream_demo", {"TEXT": as_bytes_array(["x " * 50]), "DELAY_MS": np.array([5], np.int32)}
        )
        first = await anext(stream)
        await stream.aclose()  # cancels the call; the client stays usable
        assert first["TOKEN"][0] == b"x"
        assert await client.is_server_live()


def test_stream_in_band_error_raises_with_code(server: Endpoints) -> None:
    with InferenceClient(server.grpc) as client, pytest.raises(InferenceServerError) as info:
        list(client.stream_infer("no_such_model", {"TEXT": as_bytes_array(["x"])}))
    assert info.value.code == grpc.StatusCode.NOT_FOUND


def test_unknown_model_is_not_found(server: Endpoints) -> None:
    with InferenceClient(server.grpc) as client:
        with pytest.raises(InferenceServerError) as info:
            client.infer("no_such_model", {"INPUT0": np.zeros(1, np.float32)})
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        assert "no_such_model" in info.value.message
        with pytest.raises(InferenceServerError) as info:
            client.model_metadata("no_such_model")
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        assert client.is_model_ready("no_such_model") is False


async def test_async_errors_carry_code(server: Endpoints) -> None:
    async with AsyncInferenceClient(server.grpc) as client:
        with pytest.raises(InferenceServerError) as info:
            await client.infer("add_sub", {"INPUT0": np.zeros(3, np.float32)})
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_health_metadata_and_config(server: Endpoints) -> None:
    with InferenceClient(server.grpc) as client:
        assert client.is_server_live() and client.is_server_ready()
        assert client.health() == "SERVING"
        assert client.health("add_sub") == "SERVING"
        assert client.server_metadata().name == "modelyard"
        meta = client.model_metadata("text_sentiment_demo")
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("TEXT", "BYTES", [-1, 1])]
        assert client.model_config("text_sentiment_demo").max_batch_size == 32
        client.infer("identity", {"INPUT0": np.zeros(1, np.float32)})
        stats = client.statistics("identity")
        assert stats.model_stats[0].inference_stats.success.count >= 1


async def test_async_health_and_index(server: Endpoints) -> None:
    async with AsyncInferenceClient(server.grpc) as client:
        assert await client.health() == "SERVING"
        assert await client.is_model_ready("identity")
        names = {m.name for m in await client.repository_index()}
        assert {"add_sub", "identity", "text_sentiment_demo", "token_stream_demo"} <= names


def test_unload_then_load_restores_the_model(server: Endpoints) -> None:
    with InferenceClient(server.grpc) as client:
        client.unload_model("add_sub")
        try:
            assert client.is_model_ready("add_sub") is False
            states = {m.name: m.state for m in client.repository_index()}
            assert states["add_sub"] != "READY"
            with pytest.raises(InferenceServerError):
                client.infer("add_sub", {"INPUT0": np.zeros(4, np.float32), "INPUT1": np.zeros(4, np.float32)})
        finally:
            client.load_model("add_sub")
        assert client.is_model_ready("add_sub")
        with pytest.raises(InferenceServerError) as info:
            client.load_model("no_such_model")
        assert info.value.code == grpc.StatusCode.NOT_FOUND


def test_unreachable_server_is_unavailable() -> None:
    with InferenceClient("127.0.0.1:1") as client, pytest.raises(InferenceServerError) as info:
        client.is_server_live(timeout=5)
    assert info.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

