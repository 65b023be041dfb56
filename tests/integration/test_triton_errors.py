"""Errors in Triton's words and codes, the same on gRPC and HTTP (tritonclient checks them by text),
JSON bodies on every HTTP error, and a start-up that refuses a repository it cannot serve."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import textwrap
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from modelyard.launcher import modelyard_argv
from modelyard.server.config import repository_problem
from modelyard.server.demo_models import DEMO_REPOSITORY

BROKEN = textwrap.dedent('''
    class Model:
        def load(self, ctx):
            raise RuntimeError("weights file is corrupt")
        def execute(self, requests):
            return []
''')
LEAKY = textwrap.dedent('''
    from pathlib import Path

    class Model:
        def execute(self, requests):
            open(Path(__file__).parent / "weights.bin")  # FileNotFoundError naming the absolute path
''')
CONFIG = "backend: python\ninput: [{name: X, data_type: TYPE_FP32, dims: [2]}]\n" \
         "output: [{name: Y, data_type: TYPE_FP32, dims: [2]}]\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory, server_cls):  # type: ignore[no-untyped-def]
    repo: Path = tmp_path_factory.mktemp("repo")
    shutil.copytree(DEMO_REPOSITORY / "add_sub", repo / "add_sub")
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "config.yaml").write_text(CONFIG)
    (repo / "broken" / "1" / "model.py").write_text(BROKEN)
    (repo / "leaky" / "1").mkdir(parents=True)
    (repo / "leaky" / "config.yaml").write_text(CONFIG)
    (repo / "leaky" / "1" / "model.py").write_text(LEAKY)
    srv = server_cls("--model-repository", str(repo), "--no-exit-on-error")
    srv.repo = repo
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def clients(server):  # type: ignore[no-untyped-def]
    g = grpcclient.InferenceServerClient(server.grpc_url)
    h = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))
    yield g, h
    g.close()
    h.close()


def failure(call: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


def add_sub_inputs(mod: Any) -> list[Any]:
    out = []
    for name in ("INPUT0", "INPUT1"):
        t = mod.InferInput(name, [4], "FP32")
        t.set_data_from_numpy(np.ones(4, np.float32))
        out.append(t)
    return out


# (gRPC status, HTTP status) of each kind of error, as Triton answers them (HttpCodeFromError)
NOT_FOUND = ("StatusCode.NOT_FOUND", "404")
INVALID = ("StatusCode.INVALID_ARGUMENT", "400")
UNAVAILABLE = ("StatusCode.UNAVAILABLE", "503")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_unknown_model_unknown_version_and_bad_version_string(clients, protocol: str) -> None:  # type: ignore[no-untyped-def]
    client, mod, side = (clients[0], grpcclient, 0) if protocol == "grpc" else (clients[1], httpclient, 1)
    cases = [
        (lambda: client.get_model_metadata("x"), "Request for unknown model: 'x' is not found", NOT_FOUND),
        (lambda: client.infer("x", add_sub_inputs(mod)), "Request for unknown model: 'x' is not found", NOT_FOUND),
        (lambda: client.get_model_config("add_sub", "3"),
         "Request for unknown model: 'add_sub' version 3 is not found", NOT_FOUND),
        (lambda: client.infer("add_sub", add_sub_inputs(mod), model_version="3"),
         "Request for unknown model: 'add_sub' version 3 is not found", NOT_FOUND),
        (lambda: client.get_model_metadata("add_sub", "abc"),
         "failed to get model version from specified version string 'abc' (details: stol), "
         "version should be an integral value > 0", INVALID),
        (lambda: client.get_model_metadata("x", "abc"),  # the version is checked first, as in Triton
         "failed to get model version from specified version string 'abc'", INVALID),
        (lambda: client.get_model_metadata("add_sub", "-2"),
         "invalid model version specified '-2' , version should be an integral value > 0", INVALID),
        (lambda: client.infer("broken", []), "Request for unknown model: 'broken' has no available versions",
         UNAVAILABLE),
    ]
    for call, text, codes in cases:
        err = failure(call)
        assert err.message().startswith(text), err.message()
        assert err.status() == codes[side], (text, err.status())
    # a version given as a number still finds the model
    assert client.get_model_metadata("add_sub", "01") is not None


def test_stream_errors_carry_the_same_text(clients) -> None:  # type: ignore[no-untyped-def]
    g = clients[0]
    results: list[Any] = []
    g.start_stream(callback=lambda result, error: results.append(error))
    try:
        g.async_stream_infer("x", add_sub_inputs(grpcclient))
    finally:
        g.stop_stream()
    assert len(results) == 1 and "Request for unknown model: 'x' is not found" in str(results[0])


def test_bad_inputs_are_invalid_argument_on_both_protocols(clients) -> None:  # type: ignore[no-untyped-def]
    for client, mod, code in ((clients[0], grpcclient, INVALID[0]), (clients[1], httpclient, INVALID[1])):
        x = mod.InferInput("INPUT0", [3], "FP32")
        x.set_data_from_numpy(np.ones(3, np.float32))
        inputs = [x, *add_sub_inputs(mod)[1:]]
        err = failure(lambda c=client, i=inputs: c.infer("add_sub", i))
        assert err.status() == code and "INPUT0" in err.message()


def request(server: Any, method: str, path: str, body: bytes | None = None) -> tuple[int, str, Any]:
    req = urllib.request.Request(server.http_url + path, data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), json.loads(exc.read())


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/no/such/route", 404),
    ("GET", "/v2/models/add_sub/infer", 405),
    ("DELETE", "/v2/models/add_sub", 405),
    ("PUT", "/v2/health/live", 405),
    ("GET", "/v2/models/x", 404),
    ("GET", "/v2/models/add_sub/versions/abc/config", 400),
    ("POST", "/v2/repository/models/add_sub/load", 400),  # body not JSON
    ("GET", "/v2/models/broken", 503),
])
def test_every_http_error_is_a_json_error_body(server, method: str, path: str, status: int) -> None:  # type: ignore[no-untyped-def]
    got, content_type, body = request(server, method, path, b"{nope" if method == "POST" else None)
    assert got == status and content_type.startswith("application/json")
    assert isinstance(body, dict) and isinstance(body["error"], str) and body["error"]


def test_malformed_http_is_answered_with_a_json_error_too(server) -> None:  # type: ignore[no-untyped-def]
    host, port = server.http_url.removeprefix("http://").rsplit(":", 1)
    for raw in (b"GET /v2 HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", b"BLAH\r\n\r\n"):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(raw)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.split()[1] == b"400" and b"application/json" in head.lower(), head
        assert json.loads(body)["error"]


def test_no_client_visible_error_shows_the_repository_path(server, clients) -> None:  # type: ignore[no-untyped-def]
    messages = [failure(lambda c=c: c.load_model("nope")).message() for c in clients]
    messages += [failure(lambda c=c: c.load_model("broken")).message() for c in clients]
    messages += [failure(lambda c=c: c.infer("broken", [])).message() for c in clients]
    index = json.dumps(clients[1].get_model_repository_index())
    for text in [*messages, index]:
        assert str(server.repo) not in text, text
    assert "weights file is corrupt" in messages[2]


def test_a_models_own_error_is_passed_on_without_the_server_path(server, clients) -> None:  # type: ignore[no-untyped-def]
    messages = []
    for client, mod in ((clients[0], grpcclient), (clients[1], httpclient)):
        x = mod.InferInput("X", [2], "FP32")
        x.set_data_from_numpy(np.ones(2, np.float32))
        messages.append(failure(lambda c=client, t=x: c.infer("leaky", [t])).message())
    results: list[Any] = []
    clients[0].start_stream(callback=lambda result, error: results.append(error))
    try:
        x = grpcclient.InferInput("X", [2], "FP32")
        x.set_data_from_numpy(np.ones(2, np.float32))
        clients[0].async_stream_infer("leaky", [x])
    finally:
        clients[0].stop_stream()
    messages.append(str(results[0]))
    for text in messages:
        assert "FileNotFoundError" in text and "leaky/1/weights.bin" in text, text
        assert str(server.repo) not in text, text


# ---------------------------------------------------------------------- start-up


def serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(modelyard_argv("serve", "--grpc-port", "0", "--http-port", "0", *args),
                          capture_output=True, text=True, timeout=60, check=False)


def test_a_missing_repository_stops_the_start_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir"
    done = serve("--model-repository", str(missing))
    assert done.returncode != 0 and "modelyard ready" not in done.stdout
    assert str(missing) in done.stderr and "does not exist" in done.stderr
    a_file = tmp_path / "models.txt"
    a_file.write_text("")
    done = serve("--model-repository", str(a_file))
    assert done.returncode != 0 and str(a_file) in done.stderr and "is not a directory" in done.stderr


def test_an_unreadable_repository_is_refused(tmp_path: Path) -> None:
    repo = tmp_path / "locked"
    repo.mkdir()
    repo.chmod(0)
    try:
        if os.access(repo, os.R_OK):  # root reads anything: check the decision itself
            assert repository_problem(repo) == ""
            pytest.skip("running as root: a mode-000 directory is still readable")
        assert repository_problem(repo) == "is not readable"
        done = serve("--model-repository", str(repo))
        assert done.returncode != 0 and str(repo) in done.stderr and "not readable" in done.stderr
    finally:
        repo.chmod(0o755)


@pytest.mark.parametrize(("args", "fragment"), [
    (("--model-control-mode", "explicit", "--load-model", "*", "--load-model", "add_sub"), "Wildcard model name"),
    (("--model-control-mode", "none", "--load-model", "add_sub"), "model_control_mode"),
    (("--model-control-mode", "poll", "--repository-poll-secs", "0"), "repository_poll_secs"),
])
def test_contradictory_model_control_flags_stop_the_start(args: tuple[str, ...], fragment: str) -> None:
    done = serve(*args)
    assert done.returncode == 2 and fragment in done.stderr, done.stderr


def test_explicit_mode_with_a_missing_startup_model_fails_the_start(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(DEMO_REPOSITORY / "identity", repo / "identity")
    done = serve("--model-repository", str(repo), "--model-control-mode", "explicit", "--load-model", "ghost")
    assert done.returncode == 1 and "ghost" in done.stderr and "modelyard ready" not in done.stdout


def test_model_ready_with_a_bad_version_string_is_invalid_argument(server, clients) -> None:  # type: ignore[no-untyped-def]
    g = clients[0]
    assert g.is_model_ready("add_sub", "1") and not g.is_model_ready("add_sub", "9") and not g.is_model_ready("x")
    err = failure(lambda: g.is_model_ready("add_sub", "one"))
    assert err.status() == INVALID[0] and "version string 'one'" in err.message()
    status, _, body = request(server, "GET", "/v2/models/add_sub/versions/one/ready")
    assert status == 400 and "version string 'one'" in body["error"]


def test_typed_contents_with_raw_contents_is_refused_in_triton_words(server) -> None:  # type: ignore[no-untyped-def]
    """Triton's grpc_explicit_int_content example checks this text."""
    import grpc

    from modelyard.protos import grpc_service_pb2 as pb
    from modelyard.protos import grpc_service_pb2_grpc as pb_grpc

    msg = pb.ModelInferRequest(model_name="add_sub")
    a = msg.inputs.add(name="INPUT0", datatype="FP32", shape=[4])
    a.contents.fp32_contents.extend([1.0] * 4)
    msg.inputs.add(name="INPUT1", datatype="FP32", shape=[4])
    msg.raw_input_contents.append(np.ones(4, np.float32).tobytes())
    with grpc.insecure_channel(server.grpc_url.removeprefix("http://")) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(msg, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == ("contents field must not be specified when using raw_input_contents for "
                                    "'INPUT0' for model 'add_sub'")
