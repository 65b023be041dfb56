"""Graceful shutdown, readiness and warmup gating of a real server process."""

from __future__ import annotations

import textwrap
import urllib.request
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelyard.protos import grpc_service_pb2 as pb
from modelyard.protos import grpc_service_pb2_grpc as pb_grpc
from modelyard.protos.tensors import to_raw

SLOW = textwrap.dedent('''
    import time
    from modelyard.server.types import InferResponse

    class Model:
        def execute(self, requests):
            time.sleep(float(requests[0].inputs["SECONDS"][0]))
            return [InferResponse(outputs={"DONE": requests[0].inputs["SECONDS"]})]
''')


def make_repo(root: Path) -> Path:
    (root / "slow" / "1").mkdir(parents=True)
    (root / "slow" / "config.yaml").write_text(textwrap.dedent('''\
        backend: python
        input: [{name: SECONDS, data_type: TYPE_FP32, dims: [1]}]
        output: [{name: DONE, data_type: TYPE_FP32, dims: [1]}]
    '''))
    (root / "slow" / "1" / "model.py").write_text(SLOW)
    return root


def slow_request(seconds: float) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="slow")
    req.inputs.add(name="SECONDS", datatype="FP32", shape=[1])
    req.raw_input_contents.append(to_raw(np.array([seconds], np.float32)))
    return req


def inflight(server) -> float:
    text = urllib.request.urlopen(server.http_url + "/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith('modelyard_inflight_requests{model="slow"}'):
            return float(line.split()[-1])
    return 0.0


def test_request_in_flight_at_sigterm_completes(start_server, tmp_path, poll):
    server = start_server("--model-repository", str(make_repo(tmp_path)), "--drain-delay", "0.5")
    channel = grpc.insecure_channel(server.grpc_url)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    try:
        assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        future = stub.ModelInfer.future(slow_request(1.5), timeout=30)
        poll(lambda: inflight(server) >= 1, timeout=10, message="the request to be in flight")
        server.proc.send_signal(15)
        # Health flips to NOT_SERVING first, while the server still answers (drain delay).
        poll(lambda: health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
             == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=5, message="NOT_SERVING")
        response = future.result(timeout=30)
        assert np.frombuffer(response.raw_output_contents[0], "<f4").tolist() == [1.5]
        assert server.proc.wait(30) == 0
    finally:
        channel.close()


def test_warmup_gates_readiness_and_runs_before_ready(start_server, tmp_path):
    repo = make_repo(tmp_path)
    (repo / "slow" / "config.yaml").write_text(textwrap.dedent('''\
        backend: python
        input: [{name: SECONDS, data_type: TYPE_FP32, dims: [1]}]
        output: [{name: DONE, data_type: TYPE_FP32, dims: [1]}]
        model_warmup:
          - {name: w, count: 2, inputs: {SECONDS: {data_type: TYPE_FP32, dims: [1], value: 0.2}}}
    '''))
    server = start_server("--model-repository", str(repo))
    # The ready line is printed only after warmup: statistics already count the warmup runs.
    channel = grpc.insecure_channel(server.grpc_url)
    try:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="slow"), timeout=5).model_stats[0]
        assert stats.execution_count == 2
        assert stub.ModelReady(pb.ModelReadyRequest(name="slow"), timeout=5).ready
        metrics = urllib.request.urlopen(server.http_url + "/metrics", timeout=5).read().decode()
        warm = [ln for ln in metrics.splitlines() if ln.startswith('modelyard_model_warmup_seconds{model="slow"')]
        assert warm and float(warm[0].split()[-1]) >= 0.4
    finally:
        channel.close()
