"""Model control as Triton's clients drive it (tritonclient.grpc and .http, as in Triton's
``simple_*_model_control`` examples): modes none / poll / explicit, load with a ``config`` override and
with ``file:`` overrides, unload, and errors that never show a path of the server's disk."""

from __future__ import annotations

import json
import os
import shutil
import textwrap
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from modelyard.protos import grpc_service_pb2 as pb
from modelyard.protos import grpc_service_pb2_grpc as pb_grpc
from modelyard.server.demo_models import DEMO_REPOSITORY

REFUSED = "explicit model load / unload is not allowed if polling is enabled"

DOUBLER = textwrap.dedent('''
    from modelyard.server.types import InferResponse

    class Model:
        def execute(self, requests):
            return [InferResponse(outputs={"Y": r.inputs["X"] * 2}) for r in requests]
''')
DOUBLER_CONFIG = json.dumps({
    "backend": "python",
    "max_batch_size": 0,
    "input": [{"name": "X", "data_type": "TYPE_FP32", "dims": ["3"]}],  # int64 as a string, as protobuf JSON has it
    "output": [{"name": "Y", "data_type": "TYPE_FP32", "dims": [3]}],
    "instance_group": [{"kind": "KIND_CPU", "count": 1}],
})
IMPORT_FAILS = "raise RuntimeError('cannot import this model')\n"


def make_repo(root: Path, *names: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copytree(DEMO_REPOSITORY / name, root / name)
    return root


def grpc_client(server: Any) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(server.grpc_url)


def http_client(server: Any) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))


def grpc_error(call: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


def add_sub_inputs(client_mod: Any, shape: list[int]) -> list[Any]:
    inputs = []
    for name in ("INPUT0", "INPUT1"):
        tensor = client_mod.InferInput(name, shape, "FP32")
        tensor.set_data_from_numpy(np.arange(4, dtype=np.float32).reshape(shape))
        inputs.append(tensor)
    return inputs


def doubler_infer(client: Any, client_mod: Any, name: str = "doubler") -> np.ndarray:
    x = client_mod.InferInput("X", [3], "FP32")
    x.set_data_from_numpy(np.array([1, 2, 3], dtype=np.float32))
    return client.infer(name, [x]).as_numpy("Y")


def raw_post(server: Any, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(server.http_url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def private_dirs(tmp: Path, name: str) -> list[Path]:
    return sorted(tmp.glob(f"modelyard-{name}-*"))


# ---------------------------------------------------------------------- explicit


@pytest.fixture
def explicit(start_server, tmp_path: Path):  # type: ignore[no-untyped-def]
    repo = make_repo(tmp_path / "repo", "add_sub", "identity")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    server = start_server("--model-repository", str(repo), "--model-control-mode", "explicit",
                          "--load-model", "identity", env={**os.environ, "TMPDIR": str(tmp)})
    return server, repo, tmp


def test_explicit_mode_loads_only_the_named_models_and_clients_load_the_rest(explicit) -> None:  # type: ignore[no-untyped-def]
    server, _, _ = explicit
    client = grpc_client(server)
    try:
        index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
        assert index["identity"]["state"] == "READY" and index["add_sub"]["state"] == "UNAVAILABLE"
        assert not client.is_model_ready("add_sub")
        client.load_model("add_sub")
        assert client.is_model_ready("add_sub")
        out = client.infer("add_sub", add_sub_inputs(grpcclient, [4])).as_numpy("OUTPUT0")
        assert out.tolist() == [0, 2, 4, 6]
        client.unload_model("add_sub")
        assert not client.is_model_ready("add_sub")
        client.unload_model("add_sub")  # not loaded: no error, as in Triton
        err = grpc_error(lambda: client.load_model("wrong_model_name"))
        assert "failed to load" in err.message() and err.status() == "StatusCode.NOT_FOUND"
    finally:
        client.close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_config_override_replaces_config_yaml_and_a_bad_one_keeps_the_loaded_model(explicit, protocol: str) -> None:  # type: ignore[no-untyped-def]
    server, _, _ = explicit
    mod = grpcclient if protocol == "grpc" else httpclient
    client = grpc_client(server) if protocol == "grpc" else http_client(server)
    try:
        client.load_model("add_sub")
        # the JSON of the model's own config (Triton's field names), with max_batch_size changed
        if protocol == "grpc":
            config = client.get_model_config("add_sub", as_json=True)["config"]
        else:
            config = client.get_model_config("add_sub")
        assert int(config.get("max_batch_size", 0)) == 0  # gRPC's JSON leaves defaults out
        config["max_batch_size"] = "8"
        client.load_model("add_sub", config=json.dumps(config))
        updated = client.get_model_config("add_sub", as_json=True)["config"] if protocol == "grpc" \
            else client.get_model_config("add_sub")
        assert int(updated["max_batch_size"]) == 8
        out = client.infer("add_sub", add_sub_inputs(mod, [1, 4])).as_numpy("OUTPUT1")
        assert out.shape == (1, 4)

        # not JSON at all (Triton's example sends this): "failed to load", the model keeps serving
        bad = '"parameters": {"config": {{"max_batch_size": "16"}}}'
        err = grpc_error(lambda: client.load_model("add_sub", config=bad))
        assert "failed to load" in err.message() and "Invalid config override" in err.message()
        assert err.status() in ("StatusCode.INVALID_ARGUMENT", "400")
        # valid JSON, invalid config: the field is named
        err = grpc_error(lambda: client.load_model("add_sub", config='{"max_batch_size": -1}'))
        assert "failed to load" in err.message() and "max_batch_size" in err.message()
        assert client.is_model_ready("add_sub")
        assert int((client.get_model_config("add_sub", as_json=True)["config"] if protocol == "grpc"
                    else client.get_model_config("add_sub"))["max_batch_size"]) == 8

        client.load_model("add_sub")  # without the override: config.yaml again
        again = client.get_model_config("add_sub", as_json=True)["config"] if protocol == "grpc" \
            else client.get_model_config("add_sub")
        assert int(again.get("max_batch_size", 0)) == 0
    finally:
        client.close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_file_override_loads_a_private_directory_removed_on_unload(explicit, protocol: str) -> None:  # type: ignore[no-untyped-def]
    server, repo, tmp = explicit
    mod = grpcclient if protocol == "grpc" else httpclient
    client = grpc_client(server) if protocol == "grpc" else http_client(server)
    files = {"file:1/model.py": DOUBLER.encode()}
    try:
        client.load_model("doubler", config=DOUBLER_CONFIG, files=files)
        assert client.is_model_ready("doubler")
        assert doubler_infer(client, mod).tolist() == [2, 4, 6]
        assert not (repo / "doubler").exists()  # the repository is untouched
        first = private_dirs(tmp, "doubler")
        assert len(first) == 1 and (first[0] / "1" / "model.py").read_bytes() == files["file:1/model.py"]

        client.load_model("doubler", config=DOUBLER_CONFIG, files=files)  # a reload replaces the directory
        second = private_dirs(tmp, "doubler")
        assert len(second) == 1 and second != first

        client.unload_model("doubler")
        assert not client.is_model_ready("doubler")
        assert private_dirs(tmp, "doubler") == []
    finally:
        client.close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_file_override_rules(explicit, protocol: str) -> None:  # type: ignore[no-untyped-def]
    server, _, tmp = explicit
    client = grpc_client(server) if protocol == "grpc" else http_client(server)
    try:
        # files without config: refused (Triton needs the config of the override directory)
        err = grpc_error(lambda: client.load_model("doubler", files={"file:1/model.py": DOUBLER.encode()}))
        assert "failed to load" in err.message() and "'config'" in err.message()
        # a path component longer than NAME_MAX, or one leaving the directory: refused, the server lives on
        for path in ("file:" + "A" * 256, "file:../escape.py", "file:/abs/model.py"):
            err = grpc_error(lambda p=path: client.load_model("doubler", config=DOUBLER_CONFIG, files={p: b"a"}))
            assert "Invalid file path" in err.message(), err.message()
        assert client.is_server_live()
        assert private_dirs(tmp, "doubler") == []
        assert not client.is_model_ready("doubler")
    finally:
        client.close()


def test_unrecognized_load_parameters_are_refused_with_tritons_text(explicit) -> None:  # type: ignore[no-untyped-def]
    server, _, _ = explicit
    channel = grpc.insecure_channel(server.grpc_url)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    try:
        request = pb.RepositoryModelLoadRequest(model_name="add_sub")
        request.parameters["colour"].string_param = "blue"
        with pytest.raises(grpc.RpcError) as info:
            stub.RepositoryModelLoad(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == "Unrecognized load parameter 'colour' with type 'STRING'"
        request = pb.RepositoryModelLoadRequest(model_name="add_sub")
        request.parameters["config"].bool_param = True
        with pytest.raises(grpc.RpcError) as info:
            stub.RepositoryModelLoad(request, timeout=30)
        assert info.value.details() == "Unrecognized load parameter 'config' with type 'BOOL'"
    finally:
        channel.close()
    status, body = raw_post(server, "/v2/repository/models/add_sub/load", {"parameters": {"colour": "blue"}})
    assert status == 400 and body == {"error": "Unrecognized load parameter 'colour' with type 'STRING'"}
    status, body = raw_post(server, "/v2/repository/models/add_sub/load", {"parameters": {"file:1/m.py": "!!"}})
    assert status == 400 and "base64" in body["error"]
    status, body = raw_post(server, "/v2/repository/models/add_sub/unload",
                            {"parameters": {"unload_dependents": "yes"}})
    assert status == 400 and "unload_dependents" in body["error"]


def test_unload_dependents_is_accepted_on_both_protocols(explicit) -> None:  # type: ignore[no-untyped-def]
    server, _, _ = explicit
    g, h = grpc_client(server), http_client(server)
    try:
        g.load_model("add_sub")
        g.unload_model("add_sub", unload_dependents=True)
        assert not g.is_model_ready("add_sub")
        h.load_model("add_sub")
        h.unload_model("add_sub", unload_dependents=True)
        assert not h.is_model_ready("add_sub")
        assert g.is_model_ready("identity")  # not a dependent of add_sub
    finally:
        g.close()
        h.close()


def test_load_errors_name_the_model_file_but_never_a_server_path(explicit) -> None:  # type: ignore[no-untyped-def]
    server, repo, _ = explicit
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "config.yaml").write_text("backend: python\nmax_batch_size: -3\n")
    (repo / "crashy" / "1").mkdir(parents=True)
    (repo / "crashy" / "config.yaml").write_text(
        "backend: python\ninput: [{name: X, data_type: TYPE_FP32, dims: [3]}]\n"
        "output: [{name: Y, data_type: TYPE_FP32, dims: [3]}]\n")
    (repo / "crashy" / "1" / "model.py").write_text(IMPORT_FAILS)
    g, h = grpc_client(server), http_client(server)
    try:
        for client in (g, h):
            err = grpc_error(lambda c=client: c.load_model("broken"))
            assert err.message().startswith("failed to load 'broken', failed to poll from model repository")
            assert "broken/config.yaml" in err.message() and "max_batch_size" in err.message()
            err = grpc_error(lambda c=client: c.load_model("crashy"))
            assert err.message().startswith("load failed for model 'crashy': version 1 is at UNAVAILABLE state")
            assert err.status() in ("StatusCode.INVALID_ARGUMENT", "400")
            err = grpc_error(lambda c=client: c.infer("crashy", []))
            assert "Request for unknown model: 'crashy' has no available versions" in err.message()
            for text in (client.get_model_repository_index(as_json=True)["models"] if client is g
                         else client.get_model_repository_index()):
                assert str(repo) not in json.dumps(text)
        for message in _messages(g, h, repo):
            assert str(repo) not in message and str(repo.parent) not in message, message
    finally:
        g.close()
        h.close()


def _messages(g: Any, h: Any, repo: Path) -> list[str]:
    out = []
    for client in (g, h):
        for name in ("broken", "crashy", "missing"):
            out.append(grpc_error(lambda c=client, n=name: c.load_model(n)).message())
    return out


# ---------------------------------------------------------------------- none and poll


def test_mode_none_loads_everything_and_refuses_load_and_unload(start_server, tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", "add_sub", "identity")
    server = start_server("--model-repository", str(repo), "--model-control-mode", "none")
    g, h = grpc_client(server), http_client(server)
    try:
        assert g.is_model_ready("add_sub") and g.is_model_ready("identity")
        for call in (lambda: g.load_model("add_sub"), lambda: g.unload_model("add_sub")):
            err = grpc_error(call)
            assert err.message() == REFUSED and err.status() == "StatusCode.UNAVAILABLE"
        for call in (lambda: h.load_model("add_sub"), lambda: h.unload_model("add_sub")):
            err = grpc_error(call)
            assert err.message() == REFUSED and err.status() == "503"
        assert g.is_model_ready("add_sub")
    finally:
        g.close()
        h.close()


def test_mode_poll_follows_the_repository_and_refuses_load(start_server, tmp_path: Path, poll) -> None:  # type: ignore[no-untyped-def]
    repo = make_repo(tmp_path / "repo", "identity")
    server = start_server("--model-repository", str(repo), "--model-control-mode", "poll",
                          "--repository-poll-secs", "0.2")
    g = grpc_client(server)
    try:
        assert g.is_model_ready("identity") and not g.is_model_ready("add_sub")
        err = grpc_error(lambda: g.load_model("identity"))
        assert err.message() == REFUSED

        shutil.copytree(DEMO_REPOSITORY / "add_sub", repo / "add_sub")  # a new model
        poll(lambda: g.is_model_ready("add_sub"), timeout=20, message="add_sub loaded by the poll")
        assert g.get_model_config("add_sub", as_json=True)["config"].get("max_batch_size", 0) == 0

        config = repo / "add_sub" / "config.yaml"  # a changed config
        config.write_text(config.read_text().replace("max_batch_size: 0", "max_batch_size: 4"))
        poll(lambda: int(g.get_model_config("add_sub", as_json=True)["config"].get("max_batch_size", 0)) == 4,
             timeout=20, message="add_sub reloaded with its new config")

        shutil.copytree(repo / "add_sub" / "1", repo / "add_sub" / "2")  # a new version (latest policy)
        poll(lambda: g.is_model_ready("add_sub", "2"), timeout=20, message="add_sub version 2")
        assert not g.is_model_ready("add_sub", "1")

        shutil.rmtree(repo / "add_sub")  # a removed model
        poll(lambda: not g.is_model_ready("add_sub"), timeout=20, message="add_sub unloaded")
        err = grpc_error(lambda: g.get_model_metadata("add_sub"))
        assert err.message() == "Request for unknown model: 'add_sub' is not found"
        assert g.is_model_ready("identity")
    finally:
        g.close()


def test_unset_mode_keeps_loading_everything_and_allows_load_and_unload(start_server, tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", "add_sub", "identity")
    server = start_server("--model-repository", str(repo))
    g = grpc_client(server)
    try:
        assert g.is_model_ready("add_sub") and g.is_model_ready("identity")
        config = json.dumps(g.get_model_config("add_sub", as_json=True)["config"])
        g.unload_model("add_sub")
        assert not g.is_model_ready("add_sub")
        g.load_model("add_sub", config=config)
        assert g.is_model_ready("add_sub")
    finally:
        g.close()


def test_explicit_wildcard_loads_every_model(start_server, tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", "add_sub", "identity")
    server = start_server("--model-repository", str(repo), "--model-control-mode", "explicit", "--load-model", "*")
    g = grpc_client(server)
    try:
        assert g.is_model_ready("add_sub") and g.is_model_ready("identity")
        g.unload_model("identity")
        assert not g.is_model_ready("identity")
    finally:
        g.close()


ENSEMBLE_CONFIG = textwrap.dedent('''\
    platform: ensemble
    max_batch_size: 0
    input: [{name: IN, data_type: TYPE_FP32, dims: [3]}]
    output: [{name: OUT, data_type: TYPE_FP32, dims: [3]}]
    ensemble_scheduling:
      step:
        - {model_name: doubler, model_version: -1, input_map: {X: IN}, output_map: {Y: OUT}}
''')


def test_unload_dependents_unloads_an_ensembles_steps_too(start_server, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "doubler" / "1").mkdir(parents=True)
    (repo / "doubler" / "config.yaml").write_text(
        "backend: python\ninput: [{name: X, data_type: TYPE_FP32, dims: [3]}]\n"
        "output: [{name: Y, data_type: TYPE_FP32, dims: [3]}]\n")
    (repo / "doubler" / "1" / "model.py").write_text(DOUBLER)
    (repo / "pipeline" / "1").mkdir(parents=True)
    (repo / "pipeline" / "config.yaml").write_text(ENSEMBLE_CONFIG)
    server = start_server("--model-repository", str(repo), "--model-control-mode", "explicit")
    g, h = grpc_client(server), http_client(server)
    try:
        for client in (g, h):
            client.load_model("pipeline")  # loads its step's model first
            assert client.is_model_ready("pipeline") and client.is_model_ready("doubler")
            client.unload_model("pipeline")  # without unload_dependents: the step stays
            assert not client.is_model_ready("pipeline") and client.is_model_ready("doubler")
            client.load_model("pipeline")
            client.unload_model("pipeline", unload_dependents=True)
            assert not client.is_model_ready("pipeline") and not client.is_model_ready("doubler")
    finally:
        g.close()
        h.close()
