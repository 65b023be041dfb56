"""The real grpcurl binary, through server reflection only (no proto files)."""

from __future__ import annotations

import base64
import json
import subprocess

import numpy as np
import pytest

from modelyard.launcher import grpcurl_path


def _grpcurl() -> str:
    try:
        return grpcurl_path()
    except FileNotFoundError as exc:
        pytest.fail(str(exc))


def run(server, *args: str, data: dict | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [_grpcurl(), "-plaintext"]
    if data is not None:
        cmd += ["-d", json.dumps(data)]
    cmd += [server.grpc_url, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def test_list_services(demo_server):
    out = run(demo_server, "list")
    assert out.returncode == 0, out.stderr
    assert set(out.stdout.split()) >= {
        "inference.GRPCInferenceService", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"
    }


def test_describe_service_and_message(demo_server):
    out = run(demo_server, "describe", "inference.GRPCInferenceService")
    assert out.returncode == 0, out.stderr
    assert "rpc ModelInfer ( .inference.ModelInferRequest ) returns ( .inference.ModelInferResponse )" in out.stdout
    assert "rpc ModelStreamInfer ( stream .inference.ModelInferRequest )" in out.stdout
    msg = run(demo_server, "describe", "inference.ModelInferRequest")
    assert msg.returncode == 0, msg.stderr
    assert "repeated bytes raw_input_contents = 7;" in msg.stdout


def test_model_infer_with_json_typed_contents(demo_server):
    body = {
        "model_name": "add_sub",
        "id": "grpcurl-1",
        "inputs": [
            {"name": "INPUT0", "datatype": "FP32", "shape": [4], "contents": {"fp32_contents": [1, 2, 3, 4]}},
            {"name": "INPUT1", "datatype": "FP32", "shape": [4], "contents": {"fp32_contents": [0.5, 0.5, 0.5, 0.5]}},
        ],
    }
    out = run(demo_server, "inference.GRPCInferenceService/ModelInfer", data=body)
    assert out.returncode == 0, out.stderr
    resp = json.loads(out.stdout)
    assert resp["id"] == "grpcurl-1"
    assert [o["name"] for o in resp["outputs"]] == ["OUTPUT0", "OUTPUT1"]
    sums = np.frombuffer(base64.b64decode(resp["raw_output_contents"][0]), dtype="<f4")
    np.testing.assert_allclose(sums, [1.5, 2.5, 3.5, 4.5])


def test_model_infer_bytes_with_json(demo_server):
    body = {
        "model_name": "text_sentiment_demo",
        "inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1, 1],
                    "contents": {"bytes_contents": [base64.b64encode(b"a great and happy day").decode()]}}],
    }
    out = run(demo_server, "inference.GRPCInferenceService/ModelInfer", data=body)
    assert out.returncode == 0, out.stderr
    raw = base64.b64decode(json.loads(out.stdout)["raw_output_contents"][0])
    assert raw[4:] == b"positive"


def test_bad_request_gives_status_and_message(demo_server):
    body = {"model_name": "add_sub", "inputs": [
        {"name": "INPUT0", "datatype": "FP32", "shape": [3], "contents": {"fp32_contents": [1, 2, 3]}},
        {"name": "INPUT1", "datatype": "FP32", "shape": [3], "contents": {"fp32_contents": [1, 2, 3]}},
    ]}
    out = run(demo_server, "inference.GRPCInferenceService/ModelInfer", data=body)
    assert out.returncode != 0
    assert "InvalidArgument" in out.stderr and "INPUT0" in out.stderr and "[4]" in out.stderr


@pytest.mark.parametrize("service", ["", "add_sub"])
def test_health_check(demo_server, service):
    out = run(demo_server, "grpc.health.v1.Health/Check", data={"service": service})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["status"] == "SERVING"


def test_health_check_unknown_model_is_not_found(demo_server):
    out = run(demo_server, "grpc.health.v1.Health/Check", data={"service": "no_such_model"})
    assert out.returncode != 0
    assert "NotFound" in out.stderr
