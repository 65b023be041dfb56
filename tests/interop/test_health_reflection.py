"""Health states (GET /health, modelyard.Health/Check) and server reflection v1 + v1alpha, with the real grpcurl."""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
import threading
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2 as rpb

from modelyard.launcher import grpcurl_path
from modelyard.server.demo_models import DEMO_REPOSITORY


def _grpcurl() -> str:
    try:
        return grpcurl_path()
    except FileNotFoundError as exc:
        pytest.fail(str(exc))


def grpcurl(server, *args: str, data: dict | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [_grpcurl(), "-plaintext", *(["-d", json.dumps(data)] if data is not None else []), server.grpc_url, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def health(server) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(server.http_url + "/health", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_healthy_server_over_http_and_grpc(demo_server):
    status, doc = health(demo_server)
    assert status == 200 and doc["status"] == "healthy" and doc["reasons"] == []
    assert doc["models"]["identity"]["versions"]["1"]["state"] == "READY"
    out = grpcurl(demo_server, "modelyard.Health/Check", data={})
    assert out.returncode == 0, out.stderr
    resp = json.loads(out.stdout)
    assert resp["state"] == "HEALTHY"
    assert json.loads(resp["detail_json"])["status"] == "healthy"


def test_reflection_lists_both_versions_and_describes_them(demo_server):
    out = grpcurl(demo_server, "list")
    assert out.returncode == 0, out.stderr
    assert set(out.stdout.split()) >= {"inference.GRPCInferenceService", "grpc.health.v1.Health", "modelyard.Health",
                                       "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"}
    out = grpcurl(demo_server, "describe", "grpc.reflection.v1.ServerReflection")
    assert out.returncode == 0, out.stderr
    assert "rpc ServerReflectionInfo ( stream .grpc.reflection.v1.ServerReflectionRequest )" in out.stdout
    out = grpcurl(demo_server, "describe", "modelyard.HealthCheckResponse")
    assert out.returncode == 0 and "detail_json" in out.stdout, out.stderr


def test_reflection_v1_answers_on_its_own_path(demo_server):
    """grpcurl v1.8.6 (the pinned wrapper) still speaks v1alpha; newer grpcurl asks v1 first: call v1 directly."""
    with grpc.insecure_channel(demo_server.grpc_url) as channel:
        call = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                     request_serializer=rpb.ServerReflectionRequest.SerializeToString,
                                     response_deserializer=rpb.ServerReflectionResponse.FromString)
        requests = [rpb.ServerReflectionRequest(list_services=""),
                    rpb.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService"),
                    rpb.ServerReflectionRequest(file_containing_symbol="no.such.Symbol")]
        answers = list(call(iter(requests), timeout=10))
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.reflection.v1.ServerReflection"} <= names
    assert answers[1].file_descriptor_response.file_descriptor_proto
    assert answers[2].error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


BROKEN = 'class Model:\n    def load(self, ctx):\n        raise RuntimeError("weights file is corrupt")\n'
SLOW = textwrap.dedent('''
    import time
    from modelyard.server.types import InferResponse

    class Model:
        def execute(self, requests):
            time.sleep(0.3)
            return [InferResponse(outputs={"Y": r.inputs["X"]}) for r in requests]
''')
CONFIG = textwrap.dedent('''\
    backend: python
    max_batch_size: 1
    dynamic_batching: {}
    input: [{name: X, data_type: TYPE_FP32, dims: [1]}]
    output: [{name: Y, data_type: TYPE_FP32, dims: [1]}]
''')


def _model(repo: Path, name: str, code: str) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.yaml").write_text(CONFIG)
    (repo / name / "1" / "model.py").write_text(code)


def test_degraded_when_a_model_failed_to_load(start_server, tmp_path):
    shutil.copytree(DEMO_REPOSITORY / "identity", tmp_path / "identity")
    _model(tmp_path, "broken", BROKEN)
    server = start_server("--model-repository", str(tmp_path), "--no-exit-on-error")
    status, doc = health(server)
    assert status == 200 and doc["status"] == "degraded"
    assert any("broken" in r and "weights file is corrupt" in r for r in doc["reasons"]), doc
    out = grpcurl(server, "modelyard.Health/Check", data={})
    assert out.returncode == 0 and json.loads(out.stdout)["state"] == "DEGRADED", out.stdout + out.stderr


def test_unhealthy_when_no_model_is_available(start_server, tmp_path):
    _model(tmp_path, "broken", BROKEN)
    server = start_server("--model-repository", str(tmp_path), "--no-exit-on-error")
    status, doc = health(server)
    assert status == 503 and doc["status"] == "unhealthy"
    assert "no model is available" in doc["reasons"]
    out = grpcurl(server, "modelyard.Health/Check", data={})
    assert out.returncode == 0 and json.loads(out.stdout)["state"] == "UNHEALTHY", out.stdout + out.stderr


def test_degraded_while_a_queue_is_above_the_threshold(start_server, tmp_path, poll):
    _model(tmp_path, "slow", SLOW)
    server = start_server("--model-repository", str(tmp_path), "--health-queue-depth", "2")
    assert health(server)[1]["status"] == "healthy"
    body = json.dumps({"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 1], "data": [1]}]}).encode()

    def call() -> None:
        req = urllib.request.Request(server.http_url + "/v2/models/slow/infer", data=body)
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        doc = poll(lambda: (d := health(server)[1])["status"] == "degraded" and d, timeout=10, message="degraded")
        assert any("queue depth" in r and "> 2" in r for r in doc["reasons"]), doc
    finally:
        for t in threads:
            t.join(30)
    poll(lambda: health(server)[1]["status"] == "healthy", timeout=10, message="healthy again")
