"""Tracing end to end: a real ``modelyard balance`` and ``modelyard serve`` export OTLP spans to an in-test
OTLP/gRPC receiver; one trace holds client -> balancer (call, pick) -> server (call, queue, batch, compute),
over gRPC and over REST. And with tracing off nothing imports OpenTelemetry; log lines carry request ids."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
import yaml

from modelyard.launcher import BalancerProcess, ServerProcess
from modelyard.protos import grpc_service_pb2 as pb

trace_service = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc")
trace_messages = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")


class Receiver(trace_service.TraceServiceServicer):  # type: ignore[misc]
    """A real OTLP/gRPC trace receiver (the collector's TraceService), keeping every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []

    def Export(self, request: Any, context: Any) -> Any:
        for rs in request.resource_spans:
            service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.spans.append({"service": service, "name": s.name, "trace": s.trace_id.hex(),
                                       "id": s.span_id.hex(), "parent": s.parent_span_id.hex(),
                                       "attrs": {a.key: a.value for a in s.attributes}})
        return trace_messages.ExportTraceServiceResponse()

    def trace(self, trace_id: str, names: set[str], timeout: float = 20.0) -> list[dict[str, Any]]:
        """The spans of ``trace_id`` once every name in ``names`` arrived (exports come every 0.2 s)."""
        deadline = time.monotonic() + timeout
        while True:
            spans = [s for s in list(self.spans) if s["trace"] == trace_id]
            if names <= {s["name"] for s in spans}:
                return spans
            if time.monotonic() > deadline:
                raise AssertionError(f"spans of {trace_id} after {timeout}s: {[s['name'] for s in spans]}")
            time.sleep(0.05)


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[Receiver, int]]:
    r = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service.add_TraceServiceServicer_to_server(r, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield r, port
    server.stop(0)


@pytest.fixture(scope="module")
def stack(receiver: tuple[Receiver, int], tmp_path_factory: pytest.TempPathFactory) -> Iterator[BalancerProcess]:
    _, port = receiver
    tracing = {"enabled": True, "endpoint": f"127.0.0.1:{port}", "export_interval": 0.2}
    cfg = tmp_path_factory.mktemp("serve") / "serve.yaml"
    cfg.write_text(yaml.safe_dump({"models": ["identity", "text_embed_demo"], "tracing": tracing}))
    with ServerProcess(["--config", str(cfg), "--log-level", "warning"]) as serve:
        assert serve.endpoints is not None
        doc = {"listeners": [{"address": "127.0.0.1:0"}], "admin": {"address": "127.0.0.1:0"},
               "rest": {"listeners": ["127.0.0.1:0"]}, "tracing": tracing,
               "pools": {"p": {"endpoints": {"static": [{"address": serve.endpoints.grpc,
                                                         "http": serve.endpoints.http}]}}}}
        with BalancerProcess(config=doc) as balancer:
            yield balancer


def by_name(spans: list[dict[str, Any]], name: str, service: str) -> dict[str, Any]:
    found = [s for s in spans if s["name"] == name and s["service"] == service]
    assert len(found) == 1, (name, service, spans)
    return found[0]


CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def test_one_grpc_trace_spans_balancer_pick_server_queue_batch_and_compute(
        receiver: tuple[Receiver, int], stack: BalancerProcess) -> None:
    r, _ = receiver
    assert stack.endpoints is not None
    client_span = "00f067aa0ba902b7"
    req = pb.ModelInferRequest(model_name="text_embed_demo")
    req.inputs.add(name="TEXT", datatype="BYTES", shape=[1, 1])
    req.raw_input_contents.append(len(b"traced").to_bytes(4, "little") + b"traced")
    with grpc.insecure_channel(stack.endpoints.grpc) as ch:
        ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")(
            req.SerializeToString(), timeout=10, metadata=(("traceparent", f"00-{CLIENT_TRACE}-{client_span}-01"),))
    rpc = "inference.GRPCInferenceService/ModelInfer"
    spans = r.trace(CLIENT_TRACE, {"/" + rpc, "pick", rpc, "queue", "batch", "compute"})
    call = by_name(spans, "/" + rpc, "modelyard-balancer")
    assert call["parent"] == client_span  # the balancer joined the client's trace
    assert by_name(spans, "pick", "modelyard-balancer")["parent"] == call["id"]
    server = by_name(spans, rpc, "modelyard-serve")
    assert server["parent"] == call["id"]  # forwarded with the balancer's span as parent
    assert by_name(spans, "queue", "modelyard-serve")["parent"] == server["id"]
    batch = by_name(spans, "batch", "modelyard-serve")
    assert batch["parent"] == server["id"] and batch["attrs"]["modelyard.batch_size"].int_value == 1
    assert by_name(spans, "compute", "modelyard-serve")["parent"] == batch["id"]


def test_one_rest_trace_spans_balancer_and_server(receiver: tuple[Receiver, int], stack: BalancerProcess) -> None:
    r, _ = receiver
    assert stack.endpoints is not None
    trace_id, client_span = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    body = json.dumps({"inputs": [{"name": "INPUT0", "shape": [2], "datatype": "FP32", "data": [1, 2]}]}).encode()
    request = urllib.request.Request(f"http://{stack.endpoints.http}/v2/models/identity/infer", data=body,
                                     headers={"traceparent": f"00-{trace_id}-{client_span}-01",
                                              "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert json.loads(resp.read())["outputs"][0]["data"] == [1.0, 2.0]
    name = "POST /v2/models/identity/infer"
    server_name = "POST /v2/models/{model}/infer"
    spans = r.trace(trace_id, {name, "pick", server_name, "queue", "batch", "compute"})
    call = by_name(spans, name, "modelyard-balancer")
    assert call["parent"] == client_span and call["attrs"]["http.response.status_code"].int_value == 200
    server = by_name(spans, server_name, "modelyard-serve")
    assert server["parent"] == call["id"]
    batch = by_name(spans, "batch", "modelyard-serve")
    assert batch["parent"] == server["id"]
    assert by_name(spans, "compute", "modelyard-serve")["parent"] == batch["id"]


def test_a_call_without_traceparent_starts_a_trace_the_server_joins(
        receiver: tuple[Receiver, int], stack: BalancerProcess) -> None:
    r, _ = receiver
    assert stack.endpoints is not None
    with urllib.request.urlopen(f"http://{stack.endpoints.http}/v2/models/identity?probe=untraced", timeout=10):
        pass
    deadline = time.monotonic() + 20
    while True:
        calls = [s for s in list(r.spans) if s["name"] == "GET /v2/models/identity"]
        if calls:
            break
        assert time.monotonic() < deadline, "no balancer span"
        time.sleep(0.05)
    call = calls[0]
    assert call["parent"] == ""  # a new trace
    server = r.trace(call["trace"], {"GET /v2/models/{model}"})
    assert by_name(server, "GET /v2/models/{model}", "modelyard-serve")["parent"] == call["id"]


def test_tracing_off_imports_no_opentelemetry() -> None:
    code = """
import asyncio, sys
from modelyard import tracing
from modelyard.balancer.app import Balancer
from modelyard.balancer.config import config_from_dict
import modelyard.server.main, modelyard.balancer.main, modelyard.server.scheduling.batcher
cfg = config_from_dict({"listeners": [{"address": "127.0.0.1:0"}], "admin": {"address": None},
                        "rest": {"listeners": ["127.0.0.1:0"]}, "pools": {"p": {"endpoints": {"static": []}}}})
async def main():
    b = Balancer(cfg)
    await b.start()
    await b.close()
asyncio.run(main())
assert tracing.ACTIVE is None
loaded = [m for m in sys.modules if m.startswith("opentelemetry")]
assert not loaded, loaded
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


async def test_log_lines_of_a_rest_request_carry_its_request_id() -> None:
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from modelyard.server.tracing import request_context
    from modelyard.tracing import LOG_FORMAT, RequestIdFilter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(RequestIdFilter())
    log = logging.getLogger("modelyard.test.request_id")
    log.addHandler(handler)
    log.setLevel(logging.INFO)

    async def handle(request: web.Request) -> web.Response:
        log.info("handling %s", request.path)
        return web.Response(text="ok")

    app = web.Application(middlewares=[request_context])
    app.router.add_get("/x", handle)
    try:
        async with TestClient(TestServer(app)) as client:
            await client.get("/x", headers={"x-request-id": "req-42"})
            await client.get("/x", headers={"traceparent": f"00-{CLIENT_TRACE}-00f067aa0ba902b7-01"})
            await client.get("/x")
        log.info("outside any request")
    finally:
        log.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert "[req-42]: handling /x" in lines[0]
    assert f"[{CLIENT_TRACE}]: handling /x" in lines[1]  # the trace id, when the client sent only traceparent
    assert "[r" in lines[2] and "]: handling /x" in lines[2]  # a process-unique id otherwise
    assert "[-]: outside any request" in lines[3]


def test_the_serve_command_logs_with_the_request_id_format() -> None:
    with ServerProcess(["--model", "identity", "--log-level", "info"]) as serve:
        log = serve.read_log()
    assert " [-]: modelyard serving 1 model(s)" in log, log
