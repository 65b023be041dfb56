"""``modelyard serve`` with bearer tokens, rate limits, load shedding and certificate reload (real processes).

The same rules on gRPC (unary, streams, health, reflection) and REST (KServe, OpenAI routes):
UNAUTHENTICATED/401 without a known token, PERMISSION_DENIED/403 for a model or admin operation the
token lacks, RESOURCE_EXHAUSTED/429 with a retry-after hint over a rate limit or when shedding.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import json
import os
import queue
import shutil
import socket
import ssl
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from modelyard.clients.client import InferenceClient
from modelyard.clients.errors import InferenceServerError
from modelyard.protos import grpc_service_pb2 as pb
from modelyard.protos import grpc_service_pb2_grpc as pb_grpc
from modelyard.protos.tensors import to_raw

ALICE = "alice-0123456789abcdef"     # add_sub and identity, no admin
OPS = "ops-0123456789abcdef0"        # every model, load/unload/shared_memory
BOB = "bob-0123456789abcdef00"       # identity only, 1 request/s with a burst of 2
TOKENS = f"""
"{ALICE}": {{name: alice, models: ["add_*", identity, token_stream_demo]}}
"{OPS}": {{name: ops, models: ["*"], admin: [load, unload, shared_memory]}}
"{BOB}": {{name: bob, models: [identity], rate_limit: {{rps: 1, burst: 2}}}}
"""


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def add_sub_request(model: str = "add_sub") -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model)
    for name in ("INPUT0", "INPUT1"):
        req.inputs.add(name=name, datatype="FP32", shape=[4])
        req.raw_input_contents.append(to_raw(np.arange(4, dtype=np.float32)))
    return req


def identity_request() -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="identity")
    req.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 2])
    req.raw_input_contents.append(to_raw(np.ones((1, 2), dtype=np.float32)))
    return req


def rpc_code(fn, *args, **kwargs) -> tuple[grpc.StatusCode, str, dict[str, str]]:  # type: ignore[no-untyped-def]
    try:
        fn(*args, timeout=10, **kwargs)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", dict(exc.trailing_metadata() or ())  # type: ignore[attr-defined]
    return grpc.StatusCode.OK, "", {}


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory, server_cls):
    tokens = tmp_path_factory.mktemp("auth") / "tokens.yaml"
    tokens.write_text(TOKENS)
    srv = server_cls("--auth-tokens", str(tokens), "--auth-exempt", "health,metrics")
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def stub(auth_server):
    channel = grpc.insecure_channel(auth_server.grpc_url)
    yield pb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def rest(server, method: str, path: str, token: str | None = None, body: object = None):  # type: ignore[no-untyped-def]
    """(status, JSON body, headers) of one REST call."""
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    req = urllib.request.Request(server.http_url + path, data=data, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw.startswith((b"{", b"[")) else raw, dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


# ---------------------------------------------------------------------- gRPC


def test_grpc_unauthenticated_without_a_known_token(stub):
    for metadata, fragment in (((), "needs a bearer token"), (bearer("nope-nope-nope-nope-nope"), "unknown bearer token"),
                               ((("authorization", f"Basic {ALICE}"),), "must be 'Bearer <token>'")):
        for call, request in ((stub.ModelInfer, add_sub_request()), (stub.ServerMetadata, pb.ServerMetadataRequest()),
                              (stub.RepositoryIndex, pb.RepositoryIndexRequest())):
            code, details, _ = rpc_code(call, request, metadata=metadata)
            assert code == grpc.StatusCode.UNAUTHENTICATED and fragment in details, (call, details)


def test_grpc_permission_denied_for_models_and_admin_operations(stub):
    assert rpc_code(stub.ModelInfer, add_sub_request(), metadata=bearer(ALICE))[0] == grpc.StatusCode.OK
    for model in ("text_sentiment_demo", "no_such_model"):  # a forbidden model that does not exist: not NOT_FOUND
        code, details, _ = rpc_code(stub.ModelInfer, add_sub_request(model), metadata=bearer(ALICE))
        assert code == grpc.StatusCode.PERMISSION_DENIED and f"may not use model '{model}'" in details
    code, details, _ = rpc_code(stub.ModelMetadata, pb.ModelMetadataRequest(name="text_sentiment_demo"),
                                metadata=bearer(ALICE))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    for call, request, op in (
        (stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name="add_sub"), "unload"),
        (stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="add_sub"), "load"),
        (stub.SystemSharedMemoryStatus, pb.SystemSharedMemoryStatusRequest(), "shared_memory"),
        (stub.SystemSharedMemoryRegister, pb.SystemSharedMemoryRegisterRequest(name="r", key="/k", byte_size=4),
         "shared_memory"),
        (stub.CudaSharedMemoryRegister, pb.CudaSharedMemoryRegisterRequest(name="r", raw_handle=bytes(64),
                                                                            byte_size=4), "shared_memory"),
        (stub.CudaSharedMemoryStatus, pb.CudaSharedMemoryStatusRequest(), "shared_memory"),
    ):
        code, details, _ = rpc_code(call, request, metadata=bearer(ALICE))
        assert code == grpc.StatusCode.PERMISSION_DENIED and f"admin operation '{op}'" in details, details
    # the admin token may: reload a model and read the shared memory status
    assert rpc_code(stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="add_sub"),
                    metadata=bearer(OPS))[0] == grpc.StatusCode.OK
    assert rpc_code(stub.SystemSharedMemoryStatus, pb.SystemSharedMemoryStatusRequest(),
                    metadata=bearer(OPS))[0] == grpc.StatusCode.OK


def test_lists_show_only_the_models_a_token_may_use(stub):
    index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), metadata=bearer(ALICE), timeout=10)
    assert {m.name for m in index.models} == {"add_sub", "identity", "token_stream_demo"}
    stats = stub.ModelStatistics(pb.ModelStatisticsRequest(), metadata=bearer(ALICE), timeout=10)
    assert {m.name for m in stats.model_stats} <= {"add_sub", "identity", "token_stream_demo"}
    every = stub.RepositoryIndex(pb.RepositoryIndexRequest(), metadata=bearer(OPS), timeout=10)
    assert "text_sentiment_demo" in {m.name for m in every.models}


def test_health_is_exempt_and_reflection_is_not(auth_server, stub):
    channel = grpc.insecure_channel(auth_server.grpc_url)
    try:
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
        assert stub.ModelReady(pb.ModelReadyRequest(name="add_sub"), timeout=10).ready
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = [reflection_pb2.ServerReflectionRequest(list_services="")]
        with pytest.raises(grpc.RpcError) as err:
            list(reflect.ServerReflectionInfo(iter(ask), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answers = list(reflect.ServerReflectionInfo(iter(ask), timeout=10, metadata=bearer(ALICE)))
        assert "inference.GRPCInferenceService" in {s.name for s in answers[0].list_services_response.service}
    finally:
        channel.close()


def test_stream_checks_each_message_in_band(auth_server, stub):
    with pytest.raises(grpc.RpcError) as err:
        list(stub.ModelStreamInfer(iter([add_sub_request()]), timeout=10))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    requests: queue.Queue = queue.Queue()
    replies = stub.ModelStreamInfer(iter(requests.get, None), metadata=bearer(ALICE), timeout=30)
    requests.put(add_sub_request("text_sentiment_demo"))
    first = next(replies)
    assert first.error_message.startswith("PERMISSION_DENIED: token 'alice' may not use model 'text_sentiment_demo'")
    requests.put(add_sub_request())
    second = next(replies)
    assert not second.error_message and second.infer_response.model_name == "add_sub"
    requests.put(None)
    assert list(replies) == []


def test_rate_limit_answers_resource_exhausted_with_a_retry_after(auth_server, poll):
    with InferenceClient(auth_server.grpc_url, token=BOB) as client:
        x = {"INPUT0": np.ones((1, 2), dtype=np.float32)}
        errors = []
        for _ in range(4):  # burst 2 at 1/s: at least the third and fourth are refused
            try:
                client.infer("identity", x, timeout=10)
            except InferenceServerError as exc:
                errors.append(exc)
        assert len(errors) >= 2
        e = errors[0]
        assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "client 'bob' is over its rate limit" in e.message
        assert e.retry_after is not None and 0 < e.retry_after <= 1.0
        # a token comes back (refused calls take none)
        poll(lambda: _ok(client, x), timeout=5, interval=0.1, message="bob's bucket to refill")
    # other clients are not affected
    with InferenceClient(auth_server.grpc_url, token=ALICE) as alice:
        for _ in range(5):
            alice.infer("identity", {"INPUT0": np.ones((1, 2), dtype=np.float32)}, timeout=10)
    status, body, headers = 0, {}, {}
    for _ in range(4):
        status, body, headers = rest(auth_server, "GET", "/v2/models/identity", BOB)
        if status == 429:
            break
    assert status == 429 and "rate limit" in body["error"]
    assert int(headers["Retry-After"]) >= 1 and 0 < int(headers["Retry-After-Ms"]) <= 1000


def _ok(client: InferenceClient, x: dict) -> bool:
    try:
        client.infer("identity", x, timeout=10)
        return True
    except InferenceServerError as exc:
        assert exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        return False


def test_tokens_pass_through_the_balancer(auth_server):
    """modelyard balance relays the authorization metadata; its health checks need health exempt."""
    from modelyard.launcher import BalancerProcess

    with BalancerProcess([auth_server.grpc_url], ["--log-level", "WARNING"]) as balancer, \
            grpc.insecure_channel(f"127.0.0.1:{balancer.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert rpc_code(stub.ModelInfer, add_sub_request(), metadata=bearer(ALICE))[0] == grpc.StatusCode.OK
        assert rpc_code(stub.ModelInfer, add_sub_request())[0] == grpc.StatusCode.UNAUTHENTICATED
        code, details, _ = rpc_code(stub.ModelInfer, add_sub_request("text_sentiment_demo"), metadata=bearer(ALICE))
        assert code == grpc.StatusCode.PERMISSION_DENIED, details


# ---------------------------------------------------------------------- REST and OpenAI routes


def test_rest_same_rules(auth_server):
    infer = {"inputs": [{"name": n, "shape": [4], "datatype": "FP32", "data": [1, 2, 3, 4]} for n in ("INPUT0", "INPUT1")]}
    status, body, headers = rest(auth_server, "POST", "/v2/models/add_sub/infer", body=infer)
    assert status == 401 and "bearer token" in body["error"] and headers["WWW-Authenticate"].startswith("Bearer")
    assert rest(auth_server, "POST", "/v2/models/add_sub/infer", "wrong-wrong-wrong-wrong", infer)[0] == 401
    assert rest(auth_server, "POST", "/v2/models/add_sub/infer", ALICE, infer)[0] == 200
    status, body, _ = rest(auth_server, "POST", "/v2/models/text_sentiment_demo/infer", ALICE, infer)
    assert status == 403 and "may not use model 'text_sentiment_demo'" in body["error"]
    status, body, _ = rest(auth_server, "POST", "/v2/repository/models/add_sub/unload", ALICE)
    assert status == 403 and "admin operation 'unload'" in body["error"]
    assert rest(auth_server, "GET", "/v2/systemsharedmemory/status", ALICE)[0] == 403
    assert rest(auth_server, "GET", "/v2/systemsharedmemory/status", OPS)[0] == 200
    assert rest(auth_server, "GET", "/v2/cudasharedmemory/status", ALICE)[0] == 403
    assert rest(auth_server, "GET", "/v2/cudasharedmemory/status", OPS)[0] == 200
    assert rest(auth_server, "GET", "/no/such/route")[0] == 401          # nothing to learn without a token
    status, body, _ = rest(auth_server, "POST", "/v2/repository/index", ALICE)
    assert status == 200 and {m["name"] for m in body} == {"add_sub", "identity", "token_stream_demo"}
    # exempt: health checks and metrics
    for path in ("/v2/health/live", "/v2/health/ready", "/health", "/v2/models/add_sub/ready", "/metrics"):
        assert rest(auth_server, "GET", path)[0] == 200, path
    assert rest(auth_server, "GET", "/v2")[0] == 401
    metrics = rest(auth_server, "GET", "/metrics")[1].decode()
    assert 'modelyard_refused_total{reason="unauthenticated"}' in metrics
    assert 'modelyard_refused_total{reason="permission_denied"}' in metrics


def test_openai_routes_check_the_model_in_the_body(auth_server):
    status, body, _ = rest(auth_server, "POST", "/v1/embeddings", body={"model": "text_embed_demo", "input": "hi"})
    assert status == 401 and body["error"]["code"] == 401
    status, body, _ = rest(auth_server, "POST", "/v1/embeddings", ALICE, {"model": "text_embed_demo", "input": "hi"})
    assert status == 403 and "may not use model 'text_embed_demo'" in body["error"]["message"]
    assert rest(auth_server, "GET", "/v1/models", ALICE)[1]["data"] == []


# ---------------------------------------------------------------------- load shedding

SLOW = textwrap.dedent('''
    import time
    import numpy as np
    from modelyard.server.types import InferResponse

    class Model:
        def execute(self, requests):
            out = []
            for r in requests:
                x = r.inputs["X"]
                time.sleep(float(x.reshape(-1)[0]))
                out.append(InferResponse(outputs={"Y": x}))
            return out
''')
SLOW_CONFIG = textwrap.dedent('''\
    backend: python
    input: [{name: X, data_type: TYPE_FP32, dims: [1]}]
    output: [{name: Y, data_type: TYPE_FP32, dims: [1]}]
    instance_group: [{count: 1, kind: CPU}]
''')


@pytest.fixture(scope="module")
def shed_server(tmp_path_factory, server_cls):
    repo = tmp_path_factory.mktemp("shed")
    (repo / "slow" / "1").mkdir(parents=True)
    (repo / "slow" / "config.yaml").write_text(SLOW_CONFIG)
    (repo / "slow" / "1" / "model.py").write_text(SLOW)
    srv = server_cls("--model-repository", str(repo), "--max-inflight", "4", "--max-queue-ms", "300")
    yield srv
    srv.close()


def _slow_inflight(server) -> float:  # type: ignore[no-untyped-def]
    with urllib.request.urlopen(server.http_url + "/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith('modelyard_inflight_requests{model="slow"}'):
                return float(line.split()[-1])
    return 0.0


def test_overload_is_shed_at_once_instead_of_queued(shed_server, poll):
    """One instance busy for 2 s; 6 requests at once: 1 computed, 3 refused by the queue bound after
    ~300 ms, 2 refused at once by the in-flight bound -- every refusal long before the 2 s are up."""
    x = {"X": np.array([2.0], dtype=np.float32)}

    def call() -> tuple[str, float, str, float | None]:
        t0 = time.monotonic()
        with InferenceClient(shed_server.grpc_url) as client:
            try:
                client.infer("slow", x, timeout=30)
                return "OK", time.monotonic() - t0, "", None
            except InferenceServerError as exc:
                return exc.code.name, time.monotonic() - t0, exc.message, exc.retry_after

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        first = pool.submit(call)
        poll(lambda: _slow_inflight(shed_server) == 1, message="the first request to own the instance")
        results = [first.result() for first in [first, *[pool.submit(call) for _ in range(5)]]]
    codes = sorted(r[0] for r in results)
    assert codes == ["OK"] + ["RESOURCE_EXHAUSTED"] * 5, results
    refused = [r for r in results if r[0] != "OK"]
    by_queue = [r for r in refused if "max_queue_ms" in r[2]]
    by_inflight = [r for r in refused if "max_inflight" in r[2]]
    assert len(by_queue) == 3 and len(by_inflight) == 2, results
    assert all(r[1] < 1.5 for r in refused), results     # not after the 2 s compute
    assert all(r[3] == 0.1 for r in refused)             # retry-after-ms 100 (the default hint)
    assert next(r for r in results if r[0] == "OK")[1] >= 2.0


# ---------------------------------------------------------------------- certificate reload


def fingerprint(port: int, ca: Path, cert: Path, key: Path) -> str:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        return hashlib.sha256(s.getpeercert(binary_form=True)).hexdigest()  # type: ignore[arg-type]


def replace(src: Path, dst: Path) -> None:
    """Swap a file the way a Secret update does: write aside, rename over (atomic)."""
    tmp = dst.with_suffix(".new")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def test_certificate_reload_reaches_new_connections_and_keeps_old_ones(tmp_path, cert_factory, server_cls, poll):
    live, old, new = tmp_path / "live", cert_factory(tmp_path / "old", "first"), cert_factory(tmp_path / "new", "second")
    live.mkdir()
    for name in ("server.pem", "server.key", "ca.pem"):
        shutil.copyfile(old.dir / name, live / name)
    srv = server_cls("--tls-cert", str(live / "server.pem"), "--tls-key", str(live / "server.key"),
                     "--tls-client-ca", str(live / "ca.pem"), "--tls-reload-interval", "0.1")
    try:
        gport, hport = srv.grpc_port, srv.http_port
        before = {p: fingerprint(p, old.ca, old.client_cert, old.client_key) for p in (gport, hport)}
        # old connections: a gRPC channel with an open stream, and an HTTP/1.1 keep-alive connection;
        # they trust only the first CA, so a reconnect after the swap would fail
        creds = grpc.ssl_channel_credentials(old.ca.read_bytes(), old.client_key.read_bytes(),
                                             old.client_cert.read_bytes())
        channel = grpc.secure_channel(f"127.0.0.1:{gport}", creds)
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        requests: queue.Queue = queue.Queue()
        stream = stub.ModelStreamInfer(iter(requests.get, None), timeout=60)
        requests.put(add_sub_request())
        assert not next(stream).error_message
        ctx = ssl.create_default_context(cafile=str(old.ca))
        ctx.load_cert_chain(str(old.client_cert), str(old.client_key))
        keep = http.client.HTTPSConnection("127.0.0.1", hport, context=ctx, timeout=10)
        keep.request("GET", "/v2/health/ready")
        assert keep.getresponse().read() == b'{"ready": true}'

        for name in ("server.key", "server.pem", "ca.pem"):  # the new certificate, from a new CA
            replace(new.dir / name, live / name)
        after = {}
        for p in (gport, hport):
            after[p] = poll(lambda p=p: _new_fingerprint(p, new, before[p]), timeout=15,
                            message=f"port {p} to present the new certificate")
        assert after[gport] == after[hport] != before[gport]

        requests.put(add_sub_request())                 # the open stream goes on
        assert not next(stream).error_message
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready   # the old channel's connection too
        keep.request("GET", "/v2/health/ready")          # the keep-alive connection too
        assert keep.getresponse().read() == b'{"ready": true}'
        # a new client of the old CA is refused now; one of the new CA is served
        with pytest.raises(ssl.SSLError):
            fingerprint(hport, old.ca, old.client_cert, old.client_key)
        with InferenceClient(f"127.0.0.1:{gport}", ca=str(new.ca), cert=str(new.client_cert),
                             key=str(new.client_key)) as client:
            assert client.is_server_ready(timeout=10)
        requests.put(None)
        keep.close()
        channel.close()
        assert "TLS certificate reloaded" in srv.read_log()
    finally:
        srv.close()


def _new_fingerprint(port: int, new, old_fp: str) -> str | None:  # type: ignore[no-untyped-def]
    try:
        fp = fingerprint(port, new.ca, new.client_cert, new.client_key)
    except (ssl.SSLError, OSError):
        return None  # the old certificate (another CA) is still served
    return fp if fp != old_fp else None
