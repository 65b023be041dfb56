"""Real clients against ``modelyard serve`` over TLS and mTLS with bearer tokens: grpcurl, tritonclient
(gRPC, HTTP sync and aio), the openai client, and modelyard's own CLI. Certificates are made at test time
(trustme); a client without a certificate, or with one from another CA, is refused in the handshake."""

from __future__ import annotations

import base64
import json
import os
import shutil
import ssl
import subprocess
import textwrap

import gevent.ssl
import grpc
import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.http.aio as aiohttpclient
from tritonclient.utils import InferenceServerException

from modelyard.launcher import grpcurl_path, modelyard_argv
from modelyard.server.demo_models import DEMO_REPOSITORY

TOKEN = "interop-0123456789abcdef"
HEADERS = {"authorization": f"Bearer {TOKEN}"}
EMBED = textwrap.dedent('''
    import numpy as np
    from modelyard.server.types import InferResponse

    class Model:
        def execute(self, requests):
            return [InferResponse(outputs={"EMBEDDING": np.array(
                        [[len(t), 1.0, 2.0, 3.0] for t in r.inputs["TEXT"].reshape(-1)], dtype=np.float32)})
                    for r in requests]
''')
EMBED_CONFIG = textwrap.dedent('''\
    backend: python
    max_batch_size: 8
    input: [{name: TEXT, data_type: TYPE_STRING, dims: [1]}]
    output: [{name: EMBEDDING, data_type: TYPE_FP32, dims: [4]}]
    parameters: {task: embedding}
''')


@pytest.fixture(scope="module")
def server(tmp_path_factory, server_cls, certs):
    root = tmp_path_factory.mktemp("tls-interop")
    repo = root / "models"
    for name in ("add_sub", "identity", "token_stream_demo"):
        shutil.copytree(DEMO_REPOSITORY / name, repo / name)
    (repo / "embed" / "1").mkdir(parents=True)
    (repo / "embed" / "config.yaml").write_text(EMBED_CONFIG)
    (repo / "embed" / "1" / "model.py").write_text(EMBED)
    tokens = root / "tokens.json"
    tokens.write_text(json.dumps({TOKEN: {"name": "interop", "models": ["*"]}}))
    srv = server_cls("--model-repository", str(repo), *certs.serve_args(mtls=True), "--auth-tokens", str(tokens))
    yield srv
    srv.close()


def host_port(server, kind: str) -> str:  # type: ignore[no-untyped-def]
    return f"127.0.0.1:{server.grpc_port if kind == 'grpc' else server.http_port}"


# ---------------------------------------------------------------------- grpcurl


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    try:
        exe = grpcurl_path()
    except FileNotFoundError as exc:
        pytest.fail(str(exc))
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=30)


def test_grpcurl_over_mtls_with_a_token(server, certs):
    tls = ["-cacert", str(certs.ca), "-cert", str(certs.client_cert), "-key", str(certs.client_key)]
    auth = ["-H", f"authorization: Bearer {TOKEN}"]
    target = host_port(server, "grpc")
    out = grpcurl(*tls, *auth, target, "list")
    assert out.returncode == 0, out.stderr
    assert "inference.GRPCInferenceService" in out.stdout.split()
    body = {"model_name": "add_sub", "inputs": [
        {"name": n, "datatype": "FP32", "shape": [4], "contents": {"fp32_contents": [1, 2, 3, 4]}}
        for n in ("INPUT0", "INPUT1")]}
    out = grpcurl(*tls, *auth, "-d", json.dumps(body), target, "inference.GRPCInferenceService/ModelInfer")
    assert out.returncode == 0, out.stderr
    sums = np.frombuffer(base64.b64decode(json.loads(out.stdout)["raw_output_contents"][0]), dtype="<f4")
    np.testing.assert_array_equal(sums, [2, 4, 6, 8])
    # no token: Unauthenticated; no client certificate or one of another CA: no connection; cleartext: none
    out = grpcurl(*tls, target, "list")
    assert out.returncode != 0 and "Unauthenticated" in out.stderr
    for bad in (["-cacert", str(certs.ca)],
                ["-cacert", str(certs.ca), "-cert", str(certs.rogue_cert), "-key", str(certs.rogue_key)],
                ["-plaintext"]):
        out = grpcurl("-connect-timeout", "1", "-max-time", "3", *bad, *auth, target, "list")
        assert out.returncode != 0 and "Failed to dial target host" in out.stderr, (bad, out.stdout, out.stderr)


# ---------------------------------------------------------------------- tritonclient


def test_tritonclient_grpc_over_mtls(server, certs):
    client = grpcclient.InferenceServerClient(host_port(server, "grpc"), ssl=True, root_certificates=str(certs.ca),
                                              private_key=str(certs.client_key),
                                              certificate_chain=str(certs.client_cert))
    try:
        assert client.is_server_ready(headers=HEADERS)
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        inp = grpcclient.InferInput("INPUT0", [2, 3], "FP32")
        inp.set_data_from_numpy(x)
        np.testing.assert_array_equal(client.infer("identity", [inp], headers=HEADERS).as_numpy("OUTPUT0"), x)
        with pytest.raises(InferenceServerException, match=r"UNAUTHENTICATED|bearer token"):
            client.infer("identity", [inp])
    finally:
        client.close()
    no_cert = grpcclient.InferenceServerClient(host_port(server, "grpc"), ssl=True, root_certificates=str(certs.ca))
    try:
        with pytest.raises(InferenceServerException):
            no_cert.is_server_live(headers=HEADERS, client_timeout=5)
    finally:
        no_cert.close()


def test_tritonclient_http_sync_over_mtls(server, certs):
    options = {"ca_certs": str(certs.ca), "certfile": str(certs.client_cert), "keyfile": str(certs.client_key)}
    client = httpclient.InferenceServerClient(host_port(server, "http"), ssl=True, ssl_options=options,
                                              ssl_context_factory=gevent.ssl.create_default_context)
    try:
        assert client.is_server_ready(headers=HEADERS)
        a, b = np.arange(4, dtype=np.float32), np.ones(4, dtype=np.float32)
        inputs = [httpclient.InferInput("INPUT0", [4], "FP32"), httpclient.InferInput("INPUT1", [4], "FP32")]
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(b)
        result = client.infer("add_sub", inputs, headers=HEADERS)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
        with pytest.raises(InferenceServerException, match="bearer token"):
            client.infer("add_sub", inputs)
    finally:
        client.close()
    no_cert = httpclient.InferenceServerClient(host_port(server, "http"), ssl=True,
                                               ssl_options={"ca_certs": str(certs.ca)},
                                               ssl_context_factory=gevent.ssl.create_default_context,
                                               connection_timeout=5, network_timeout=5)
    try:
        with pytest.raises(Exception):  # noqa: B017 -- gevent's SSL error or a closed connection
            no_cert.is_server_live(headers=HEADERS)
    finally:
        no_cert.close()


async def test_tritonclient_http_aio_over_mtls(server, certs):
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    ctx.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    client = aiohttpclient.InferenceServerClient(host_port(server, "http"), ssl=True, ssl_context=ctx)
    try:
        assert await client.is_server_live(headers=HEADERS)
        inp = aiohttpclient.InferInput("INPUT0", [1, 2], "INT32")
        inp.set_data_from_numpy(np.array([[7, 8]], dtype=np.int32))
        result = await client.infer("identity", [inp], headers=HEADERS)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), [[7, 8]])
    finally:
        await client.close()


# ---------------------------------------------------------------------- openai client, modelyard CLI


def test_openai_client_sends_its_api_key_as_the_bearer_token(server, certs):
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    ctx.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    base = f"https://{host_port(server, 'http')}/v1"
    with openai.DefaultHttpxClient(verify=ctx) as http:
        client = openai.OpenAI(base_url=base, api_key=TOKEN, http_client=http, max_retries=0, timeout=30)
        out = client.embeddings.create(model="embed", input=["abc", "hello"], encoding_format="float")
        assert [d.embedding[0] for d in out.data] == [3.0, 5.0]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base, api_key="wrong-wrong-wrong-wrong", http_client=http,
                          max_retries=0).embeddings.create(model="embed", input="x")


def test_modelyard_cli_over_mtls(server, certs):
    tls = ["--url", host_port(server, "grpc"), "--ca", str(certs.ca), "--cert", str(certs.client_cert),
           "--key", str(certs.client_key)]
    env = {**os.environ, "MODELYARD_TOKEN": TOKEN}
    out = subprocess.run(modelyard_argv("infer", "add_sub", "-i", "INPUT0=[1,2,3,4]", "-i", "INPUT1=[1,1,1,1]",
                                        "--json", *tls), capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["outputs"]["OUTPUT0"]["data"] == [2.0, 3.0, 4.0, 5.0]
    out = subprocess.run(modelyard_argv("infer", "token_stream_demo", "-i", 'TEXT=["a b c"]', "--stream", "--json",
                                        *tls), capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 3, out.stderr
    env.pop("MODELYARD_TOKEN")
    out = subprocess.run(modelyard_argv("models", *tls), capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 1 and "UNAUTHENTICATED" in out.stderr
    out = subprocess.run(modelyard_argv("models", *tls[:-4], "--cert", str(certs.client_cert)),
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2 and "give both or neither" in out.stderr


def test_grpc_alpn_is_h2_and_http_alpn_is_http11(server, certs):
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    ctx.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    import socket

    for port, offered, chosen in ((server.grpc_port, ["h2", "http/1.1"], "h2"),
                                  (server.http_port, ["h2", "http/1.1"], "http/1.1")):
        ctx.set_alpn_protocols(offered)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            assert s.selected_alpn_protocol() == chosen
            assert s.version() in ("TLSv1.2", "TLSv1.3")
    _ = grpc  # the gRPC side is grpc core's own TLS (credentials from modelyard.security.tls)
