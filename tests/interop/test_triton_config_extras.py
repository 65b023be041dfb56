"""The parts of Triton's model config and server metadata its examples read: output labels
(``label_filename``) in classification results, input ``format``, and the server name."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

SCORES = textwrap.dedent('''
    import numpy as np
    from modelyard.server.types import InferResponse

    class Model:
        def execute(self, requests):
            return [InferResponse(outputs={"SCORES": r.inputs["IMAGE"].reshape(r.inputs["IMAGE"].shape[0], -1)[:, :4]})
                    for r in requests]
''')
CONFIG = """backend: python
max_batch_size: 2
input: [{name: IMAGE, data_type: TYPE_FP32, format: FORMAT_NCHW, dims: [1, 2, 2]}]
output: [{name: SCORES, data_type: TYPE_FP32, dims: [4], label_filename: labels.txt}]
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory, server_cls):  # type: ignore[no-untyped-def]
    repo: Path = tmp_path_factory.mktemp("repo")
    (repo / "scores" / "1").mkdir(parents=True)
    (repo / "scores" / "config.yaml").write_text(CONFIG)
    (repo / "scores" / "labels.txt").write_text("cat\ndog\nbird\nfish\n")
    (repo / "scores" / "1" / "model.py").write_text(SCORES)
    srv = server_cls("--model-repository", str(repo), "--server-name", "triton")
    yield srv
    srv.close()


def _image(mod):  # type: ignore[no-untyped-def]
    x = mod.InferInput("IMAGE", [1, 1, 2, 2], "FP32")
    x.set_data_from_numpy(np.array([[[[0.1, 0.7], [0.2, 0.5]]]], np.float32))
    return [x]


def test_classification_carries_labels_on_both_protocols(server) -> None:  # type: ignore[no-untyped-def]
    with grpcclient.InferenceServerClient(server.grpc_url.removeprefix("http://")) as g:
        r = g.infer("scores", _image(grpcclient), outputs=[grpcclient.InferRequestedOutput("SCORES", class_count=2)])
        assert [v.decode() for v in r.as_numpy("SCORES")[0]] == ["0.700000:1:dog", "0.500000:3:fish"]
        cfg = g.get_model_config("scores", as_json=True)["config"]
        assert cfg["input"][0]["format"] == "FORMAT_NCHW"
        assert cfg["output"][0]["label_filename"] == "labels.txt"
        assert g.get_server_metadata().name == "triton"
    with httpclient.InferenceServerClient(server.http_url.removeprefix("http://")) as h:
        r = h.infer("scores", _image(httpclient), outputs=[httpclient.InferRequestedOutput("SCORES", class_count=3)])
        assert [v.decode() for v in r.as_numpy("SCORES")[0]] == ["0.700000:1:dog", "0.500000:3:fish", "0.200000:2:bird"]
        assert h.get_server_metadata()["name"] == "triton"


def test_a_missing_label_file_fails_the_load_naming_it(tmp_path: Path, server_cls) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "scores" / "1").mkdir(parents=True)
    (tmp_path / "scores" / "config.yaml").write_text(CONFIG)
    (tmp_path / "scores" / "1" / "model.py").write_text(SCORES)
    srv = server_cls("--model-repository", str(tmp_path), "--no-exit-on-error")
    try:
        with grpcclient.InferenceServerClient(srv.grpc_url.removeprefix("http://")) as g:
            index = g.get_model_repository_index(as_json=True)["models"]
            assert "label_filename" in index[0]["reason"] and "labels.txt" in index[0]["reason"]
            assert str(tmp_path) not in index[0]["reason"]
    finally:
        srv.close()
