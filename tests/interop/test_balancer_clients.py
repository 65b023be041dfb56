"""tritonclient and grpcurl through ``modelyard balance`` (unary, streaming, reflection)."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelyard.launcher import BalancerProcess

GRPCURL = Path(sys.executable).parent / "grpcurl"


@pytest.fixture
def balanced(start_server: Any) -> Iterator[str]:
    """Two demo replicas behind a balancer; yields the balancer's host:port."""
    replicas = [start_server() for _ in range(2)]
    with BalancerProcess([r.grpc_url for r in replicas], ["--no-admin", "--picker", "least_conn",
                                                          "--log-level", "WARNING"]) as balancer:
        assert balancer.endpoints is not None
        yield balancer.endpoints.grpc


def test_tritonclient_unary_and_streaming_through_the_balancer(balanced: str) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(balanced)
    try:
        assert client.is_server_live() and client.is_model_ready("add_sub")
        a = np.arange(4, dtype=np.float32)
        inputs = [grpcclient.InferInput("INPUT0", [4], "FP32"), grpcclient.InferInput("INPUT1", [4], "FP32")]
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(a * 2)
        for _ in range(4):  # both replicas
            res = client.infer("add_sub", inputs)
            np.testing.assert_allclose(res.as_numpy("OUTPUT0"), a * 3)
        results: queue.Queue[Any] = queue.Queue()
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        for i in range(3):
            client.async_stream_infer("add_sub", inputs, request_id=str(i))
        got = [results.get(timeout=15) for _ in range(3)]
        client.stop_stream()
        assert all(err is None for _, err in got)
        np.testing.assert_allclose(got[0][0].as_numpy("OUTPUT1"), -a)
    finally:
        client.close()


def grpcurl(*args: str) -> str:
    out = subprocess.run([str(GRPCURL), "-plaintext", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_grpcurl_uses_reflection_health_and_streaming_through_the_balancer(balanced: str) -> None:
    services = grpcurl(balanced, "list")
    assert "inference.GRPCInferenceService" in services and "grpc.health.v1.Health" in services
    assert json.loads(grpcurl(balanced, "grpc.health.v1.Health/Check"))["status"] == "SERVING"
    ready = grpcurl("-d", '{"name": "identity"}', balanced, "inference.GRPCInferenceService/ModelReady")
    assert json.loads(ready)["ready"] is True
    req = {"model_name": "add_sub", "inputs": [
        {"name": "INPUT0", "datatype": "FP32", "shape": [4], "contents": {"fp32_contents": [1, 2, 3, 4]}},
        {"name": "INPUT1", "datatype": "FP32", "shape": [4], "contents": {"fp32_contents": [1, 1, 1, 1]}}]}
    out = grpcurl("-d", json.dumps(req), balanced, "inference.GRPCInferenceService/ModelStreamInfer")
    assert "inferResponse" in out or "infer_response" in out
