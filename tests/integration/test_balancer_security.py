"""``modelyard balance`` exposed securely: TLS/mTLS on its gRPC and REST listeners, mTLS to the
replicas, bearer tokens with model and admin allow lists, per-client rate limits, certificate reload.

Everything real: two ``modelyard serve`` replicas that accept only mTLS clients, the balancer as a
process, tritonclient (gRPC and HTTP), grpcurl and Envoy as clients. Certificates come from trustme.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent.ssl
import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from modelyard.launcher import BalancerProcess, Process, ServerProcess, free_port, grpcurl_path
from modelyard.protos import grpc_service_pb2 as pb
from modelyard.protos import grpc_service_pb2_grpc as pbg
from modelyard.server.demo_models import DEMO_REPOSITORY

ADMIN, LIMITED, SLOW = "admin-token-0123456789", "limited-token-0123456789", "slow-token-0123456789"
TOKENS = {
    ADMIN: {"name": "ops", "models": ["*"], "admin": ["load", "unload"]},
    LIMITED: {"name": "identity-only", "models": ["identity*"]},
    SLOW: {"name": "slow", "models": ["*"], "rate_limit": {"rps": 0.5, "burst": 2}},
}


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def replicas(server_cls: type[ServerProcess], certs: Any) -> Iterator[list[ServerProcess]]:
    """Two replicas that accept only clients with a certificate from the test CA (the balancer's)."""
    procs = [server_cls("--model-repository", str(DEMO_REPOSITORY), *certs.serve_args(mtls=True)) for _ in range(2)]
    yield procs
    for p in procs:
        p.close()


def balancer_config(certs: Any, replicas: list[ServerProcess], tokens: Path, **tls: Any) -> dict[str, Any]:
    return {
        "listeners": [{"address": "127.0.0.1:0"}],
        "admin": {"address": "127.0.0.1:0"},
        "tls": {"cert": str(certs.server_cert), "key": str(certs.server_key), "client_ca": str(certs.ca), **tls},
        "auth": {"tokens_file": str(tokens), "exempt": ["health"]},
        "rest": {"listeners": [{"address": "127.0.0.1:0"}]},
        "pools": {"default": {
            "picker": "round_robin",
            "endpoints": {"static": [{"address": r.grpc_url, "http": r.endpoints.http}  # type: ignore[union-attr]
                                     for r in replicas]},
            "health_check": {"interval": 0.3},
            "tls": {"ca": str(certs.ca), "cert": str(certs.client_cert), "key": str(certs.client_key)},
        }},
    }


@pytest.fixture(scope="module")
def balancer(replicas: list[ServerProcess], certs: Any, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[BalancerProcess]:
    tokens = tmp_path_factory.mktemp("balancer-auth") / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    with BalancerProcess(config=balancer_config(certs, replicas, tokens)) as b:
        wait_serving(b, certs)
        yield b


def grpc_client(b: BalancerProcess, certs: Any, cert: bool = True) -> grpcclient.InferenceServerClient:
    kw = {"private_key": str(certs.client_key), "certificate_chain": str(certs.client_cert)} if cert else {}
    return grpcclient.InferenceServerClient(f"127.0.0.1:{b.port}", ssl=True, root_certificates=str(certs.ca), **kw)


def channel(b: BalancerProcess, certs: Any) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(certs.ca.read_bytes(), certs.client_key.read_bytes(),
                                         certs.client_cert.read_bytes())
    return grpc.secure_channel(f"127.0.0.1:{b.port}", creds)


def wait_serving(b: BalancerProcess, certs: Any, timeout: float = 20.0) -> None:
    """Until an inference through the balancer succeeds (the health checks over mTLS found the replicas)."""
    client = grpc_client(b, certs)
    deadline = time.monotonic() + timeout
    while True:
        try:
            infer(client, ADMIN)
            return
        except InferenceServerException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def identity_input(values: list[float]) -> list[grpcclient.InferInput]:
    inp = grpcclient.InferInput("INPUT0", [1, len(values)], "FP32")
    inp.set_data_from_numpy(np.array([values], dtype=np.float32))
    return [inp]


def infer(client: grpcclient.InferenceServerClient, token: str | None, model: str = "identity") -> np.ndarray:
    headers = bearer(token) if token else None
    if model == "identity":
        out = client.infer(model, identity_input([1.0, 2.0, 3.0]), headers=headers, client_timeout=10)
        return np.asarray(out.as_numpy("OUTPUT0"))
    a = grpcclient.InferInput("INPUT0", [4], "FP32")
    b = grpcclient.InferInput("INPUT1", [4], "FP32")
    for t in (a, b):
        t.set_data_from_numpy(np.ones(4, dtype=np.float32))
    return np.asarray(client.infer(model, [a, b], headers=headers, client_timeout=10).as_numpy("OUTPUT0"))


def code_of(fn: Any) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as info:
        fn()
    return str(info.value.status()), str(info.value.message())


# ---------------------------------------------------------------------- gRPC: tritonclient, grpcurl, grpc


def test_tritonclient_grpc_over_mtls_reaches_replicas_over_mtls(balancer: BalancerProcess, certs: Any,
                                                                replicas: list[ServerProcess]) -> None:
    client = grpc_client(balancer, certs)
    for _ in range(4):  # round robin: both replicas, each over the balancer's own mTLS connection
        np.testing.assert_array_equal(infer(client, ADMIN), [[1.0, 2.0, 3.0]])
    assert client.is_server_live(headers=bearer(ADMIN))
    # a client without a certificate is refused during the handshake
    status, _ = code_of(lambda: infer(grpc_client(balancer, certs, cert=False), ADMIN))
    assert status == "StatusCode.UNAVAILABLE"


def test_tokens_are_checked_at_the_balancer(balancer: BalancerProcess, certs: Any) -> None:
    client = grpc_client(balancer, certs)
    status, message = code_of(lambda: infer(client, None))
    assert status == "StatusCode.UNAUTHENTICATED" and "bearer token" in message
    status, message = code_of(lambda: infer(client, "not-a-known-token-at-all"))
    assert status == "StatusCode.UNAUTHENTICATED" and "unknown bearer token" in message
    # health is exempt (auth.exempt: [health]): a probe needs no token
    assert client.is_server_ready()
    # a token limited to identity*: other models and admin operations are PERMISSION_DENIED
    np.testing.assert_array_equal(infer(client, LIMITED), [[1.0, 2.0, 3.0]])
    status, message = code_of(lambda: infer(client, LIMITED, "add_sub"))
    assert status == "StatusCode.PERMISSION_DENIED" and "add_sub" in message
    status, message = code_of(lambda: client.unload_model("identity", headers=bearer(LIMITED)))
    assert status == "StatusCode.PERMISSION_DENIED" and "unload" in message
    # the admin token may load (the replica answers; the request went through)
    client.load_model("identity", headers=bearer(ADMIN))


def test_a_stream_cannot_switch_to_a_model_its_token_does_not_allow(balancer: BalancerProcess, certs: Any) -> None:
    with channel(balancer, certs) as ch:
        stub = pbg.GRPCInferenceServiceStub(ch)

        def request(model: str) -> pb.ModelInferRequest:
            req = pb.ModelInferRequest(model_name=model)
            t = req.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 1])
            t.contents.fp32_contents.append(1.0)
            if model == "add_sub":
                t.shape[:] = [4]
                t.contents.fp32_contents[:] = [1.0] * 4
                u = req.inputs.add(name="INPUT1", datatype="FP32", shape=[4])
                u.contents.fp32_contents.extend([1.0] * 4)
            return req

        def sent() -> Iterator[pb.ModelInferRequest]:
            yield request("identity")
            time.sleep(0.3)  # its answer comes back first
            yield request("add_sub")

        answers = stub.ModelStreamInfer(sent(), metadata=tuple(bearer(LIMITED).items()), timeout=10)
        first = next(answers)
        assert not first.error_message and first.infer_response.model_name == "identity"
        with pytest.raises(grpc.RpcError) as info:
            next(answers)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "add_sub" in str(info.value.details())
        # the same stream with the admin token carries both models
        answers = list(stub.ModelStreamInfer(sent(), metadata=tuple(bearer(ADMIN).items()), timeout=10))
        assert [a.infer_response.model_name for a in answers] == ["identity", "add_sub"]


def test_rate_limit_answers_resource_exhausted_with_a_retry_after_hint(balancer: BalancerProcess, certs: Any) -> None:
    with channel(balancer, certs) as ch:
        live = ch.unary_unary("/inference.GRPCInferenceService/ModelMetadata",
                              request_serializer=pb.ModelMetadataRequest.SerializeToString,
                              response_deserializer=pb.ModelMetadataResponse.FromString)
        md = tuple(bearer(SLOW).items())
        for _ in range(2):  # the burst
            live(pb.ModelMetadataRequest(name="identity"), metadata=md, timeout=5)
        with pytest.raises(grpc.RpcError) as info:
            live(pb.ModelMetadataRequest(name="identity"), metadata=md, timeout=5)
    err = info.value
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "slow" in str(err.details())
    hints = dict(err.trailing_metadata() or ())  # type: ignore[attr-defined]
    assert 1 <= int(hints["retry-after-ms"]) <= 2000


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    try:
        exe = grpcurl_path()
    except FileNotFoundError as exc:
        pytest.fail(str(exc))
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=30)


def test_grpcurl_over_mtls_with_a_token(balancer: BalancerProcess, certs: Any) -> None:
    tls = ["-cacert", str(certs.ca), "-cert", str(certs.client_cert), "-key", str(certs.client_key)]
    target = f"127.0.0.1:{balancer.port}"
    body = json.dumps({"name": "identity"})
    out = grpcurl(*tls, "-H", f"authorization: Bearer {ADMIN}", "-d", body, target,
                  "inference.GRPCInferenceService/ModelMetadata")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["name"] == "identity"
    out = grpcurl(*tls, "-d", body, target, "inference.GRPCInferenceService/ModelMetadata")
    assert out.returncode != 0 and "Unauthenticated" in out.stderr
    out = grpcurl("-connect-timeout", "1", "-max-time", "3", "-cacert", str(certs.ca), "-cert", str(certs.rogue_cert),
                  "-key", str(certs.rogue_key), target, "list")
    assert out.returncode != 0 and "Failed to dial target host" in out.stderr


# ---------------------------------------------------------------------- REST: tritonclient.http over HTTPS


def http_client(b: BalancerProcess, certs: Any) -> httpclient.InferenceServerClient:
    assert b.endpoints is not None and b.endpoints.http
    options = {"ca_certs": str(certs.ca), "certfile": str(certs.client_cert), "keyfile": str(certs.client_key)}
    return httpclient.InferenceServerClient(b.endpoints.http, ssl=True, ssl_options=options,
                                            ssl_context_factory=gevent.ssl.create_default_context)


def test_tritonclient_http_over_mtls_through_the_rest_listener(balancer: BalancerProcess, certs: Any) -> None:
    client = http_client(balancer, certs)
    try:
        inp = httpclient.InferInput("INPUT0", [1, 2], "FP32")
        inp.set_data_from_numpy(np.array([[5.0, 6.0]], dtype=np.float32))
        out = client.infer("identity", [inp], headers=bearer(LIMITED))
        np.testing.assert_array_equal(out.as_numpy("OUTPUT0"), [[5.0, 6.0]])
        with pytest.raises(InferenceServerException) as info:
            client.infer("identity", [inp])
        assert "401" in str(info.value.status()) or "bearer token" in str(info.value)
        with pytest.raises(InferenceServerException) as info:
            client.get_model_metadata("add_sub", headers=bearer(LIMITED))
        assert "403" in str(info.value.status()) or "may not use model" in str(info.value)
        assert client.is_server_live()  # health: exempt
    finally:
        client.close()


def test_rest_rate_limit_is_429_with_retry_after(balancer: BalancerProcess, certs: Any) -> None:
    assert balancer.endpoints is not None and balancer.endpoints.http
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    ctx.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    host, port = balancer.endpoints.http.rsplit(":", 1)
    statuses, retry_after = [], None
    with socket.create_connection((host, int(port)), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        reader = s.makefile("rb")
        for _ in range(4):
            s.sendall(b"GET /v2/models/identity HTTP/1.1\r\nhost: x\r\nauthorization: Bearer "
                      + SLOW.encode() + b"\r\n\r\n")
            status = int(reader.readline().split()[1])
            length = 0
            while (line := reader.readline().strip()):
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
                elif name.lower() == b"retry-after":
                    retry_after = int(value)
            reader.read(length)
            statuses.append(status)
    assert 429 in statuses, statuses
    assert retry_after is not None and 1 <= retry_after <= 3


# ---------------------------------------------------------------------- certificate reload, Envoy as a client


def leaf_fingerprint(port: int, certs: Any) -> bytes:
    ctx = ssl.create_default_context(cafile=None)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw) as s:
        der = s.getpeercert(binary_form=True)
        assert s.selected_alpn_protocol() == "h2"
        assert der is not None
        return der


def test_a_new_certificate_is_served_to_new_connections_without_dropping_old_ones(
        replicas: list[ServerProcess], certs: Any, cert_factory: Any, tmp_path: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    for f in (certs.server_cert, certs.server_key, certs.ca):
        shutil.copy(f, live / f.name)
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    cfg = balancer_config(certs, replicas, tokens, reload_interval=0.2)
    cfg["tls"].update(cert=str(live / certs.server_cert.name), key=str(live / certs.server_key.name))
    with BalancerProcess(config=cfg) as b:
        wait_serving(b, certs)
        before = leaf_fingerprint(b.port, certs)
        old = grpc_client(b, certs)  # an established connection, kept across the reload
        infer(old, ADMIN)
        fresh = cert_factory(tmp_path / "new", "modelyard renewed")
        # the new server certificate is signed by a new CA; clients still present the old CA's certificates
        shutil.copy(fresh.server_key, live / certs.server_key.name)
        shutil.copy(fresh.server_cert, live / certs.server_cert.name)
        deadline = time.monotonic() + 10
        while leaf_fingerprint(b.port, certs) == before:
            assert time.monotonic() < deadline, "the balancer never served the new certificate"
            time.sleep(0.1)
        np.testing.assert_array_equal(infer(old, ADMIN), [[1.0, 2.0, 3.0]])  # not dropped


def test_envoy_originates_mtls_to_the_balancer(balancer: BalancerProcess, certs: Any, tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from envoy_proxy import envoy_binary

    try:
        binary = envoy_binary()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    listen, admin = free_port(), free_port()
    config = tmp_path / "envoy.yaml"
    config.write_text(ENVOY_MTLS.format(listen=listen, admin=admin, port=balancer.port, ca=certs.ca,
                                        cert=certs.client_cert, key=certs.client_key))
    with Process([binary, "-c", str(config), "--concurrency", "1", "-l", "error", "--disable-hot-restart"],
                 ready=listen, name="envoy"):
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{listen}")
        deadline = time.monotonic() + 10
        while True:
            try:
                np.testing.assert_array_equal(infer(client, ADMIN), [[1.0, 2.0, 3.0]])
                break
            except InferenceServerException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        status, _ = code_of(lambda: infer(client, LIMITED, "add_sub"))
        assert status == "StatusCode.PERMISSION_DENIED"


ENVOY_MTLS = """\
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}
static_resources:
  listeners:
  - address: {{socket_address: {{address: 127.0.0.1, port_value: {listen}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          codec_type: HTTP2
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{{match: {{prefix: "/"}}, route: {{cluster: modelyard}}}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: modelyard
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: modelyard
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: localhost
        common_tls_context:
          alpn_protocols: [h2]
          tls_certificates:
          - certificate_chain: {{filename: "{cert}"}}
            private_key: {{filename: "{key}"}}
          validation_context:
            trusted_ca: {{filename: "{ca}"}}
"""
