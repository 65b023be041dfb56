"""OpenAI-style REST adapters over the same models: embeddings, completions (plain and SSE), models."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import numpy as np


async def test_models_lists_embedding_and_generation_models(tiny_server: Any) -> None:
    async with aiohttp.ClientSession() as s, s.get(tiny_server.http_url + "/v1/models") as r:
        body = await r.json()
    ids = {m["id"]: m["task"] for m in body["data"]}
    assert ids["tiny_embed"] == "embedding" and ids["tiny_gpt2"] == "text-generation"
    assert "tiny_classifier" not in ids


async def test_embeddings_match_the_v2_infer_path(tiny_server: Any) -> None:
    texts = ["hello world", "a small cat"]
    async with aiohttp.ClientSession() as s:
        async with s.post(tiny_server.http_url + "/v1/embeddings", json={"model": "tiny_embed", "input": texts}) as r:
            assert r.status == 200, await r.text()
            body = await r.json()
        v2 = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [2, 1], "data": texts}]}
        async with s.post(tiny_server.http_url + "/v2/models/tiny_embed/infer", json=v2) as r:
            ref = np.asarray((await r.json())["outputs"][0]["data"]).reshape(2, 32)
    got = np.asarray([d["embedding"] for d in body["data"]])
    assert [d["index"] for d in body["data"]] == [0, 1]
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert body["usage"]["prompt_tokens"] > 0


async def test_embeddings_of_a_generation_model_is_not_found(tiny_server: Any) -> None:
    async with aiohttp.ClientSession() as s, s.post(
        tiny_server.http_url + "/v1/embeddings", json={"model": "tiny_gpt2", "input": "x"}
    ) as r:
        assert r.status == 404


async def test_completion_plain_and_streamed_agree(tiny_server: Any) -> None:
    req = {"model": "tiny_gpt2", "prompt": "once upon a time", "max_tokens": 5}
    async with aiohttp.ClientSession() as s:
        async with s.post(tiny_server.http_url + "/v1/completions", json=req) as r:
            assert r.status == 200, await r.text()
            plain = await r.json()
        async with s.post(tiny_server.http_url + "/v1/completions", json={**req, "stream": True}) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            events = [line[len("data: "):] for line in (await r.text()).splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert 1 <= len(chunks) <= 5
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]


async def test_completion_rejects_bad_max_tokens(tiny_server: Any) -> None:
    async with aiohttp.ClientSession() as s, s.post(
        tiny_server.http_url + "/v1/completions", json={"model": "tiny_gpt2", "prompt": "x", "max_tokens": 0}
    ) as r:
        assert r.status == 400
