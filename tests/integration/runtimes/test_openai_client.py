"""The real ``openai`` Python client pointed at ``modelyard serve``: models, embeddings (float and base64),
completions and chat completions, streamed and not."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pytest

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def client(tiny_server: Any) -> Any:
    c = openai.OpenAI(base_url=tiny_server.http_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    yield c
    c.close()


def test_models(client: Any) -> None:
    ids = {m.id for m in client.models.list()}
    assert {"tiny_embed", "tiny_gpt2"} <= ids


def test_embeddings_float_and_base64_agree(client: Any, tiny_server: Any) -> None:
    texts = ["hello world", "a small cat"]
    as_float = client.embeddings.create(model="tiny_embed", input=texts, encoding_format="float")
    # the client's default asks for base64 and decodes it itself
    default = client.embeddings.create(model="tiny_embed", input=texts)
    assert [d.index for d in as_float.data] == [0, 1]
    np.testing.assert_allclose(np.array([d.embedding for d in default.data]),
                               np.array([d.embedding for d in as_float.data]), atol=1e-6)
    raw = client.embeddings.with_raw_response.create(model="tiny_embed", input="hello world",
                                                     encoding_format="base64")
    encoded = raw.http_response.json()["data"][0]["embedding"]
    assert isinstance(encoded, str)
    vec = np.frombuffer(base64.b64decode(encoded), dtype="<f4")
    np.testing.assert_allclose(vec, as_float.data[0].embedding, atol=1e-6)
    assert as_float.usage.prompt_tokens > 0


def test_chat_completion_plain_and_streamed_agree(client: Any) -> None:
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Once upon a time"}]
    plain = client.chat.completions.create(model="tiny_gpt2", messages=messages, max_tokens=5)
    choice = plain.choices[0]
    assert plain.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= plain.usage.completion_tokens <= 5
    chunks = list(client.chat.completions.create(model="tiny_gpt2", messages=messages, max_tokens=5, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == choice.message.content


def test_completions_through_the_client(client: Any) -> None:
    done = client.completions.create(model="tiny_gpt2", prompt="hello", max_tokens=3)
    assert done.choices[0].finish_reason in ("stop", "length")
    pieces = [c.choices[0].text for c in client.completions.create(model="tiny_gpt2", prompt="hello", max_tokens=3,
                                                                  stream=True)]
    assert "".join(pieces) == done.choices[0].text


async def test_async_client_streams_chat(tiny_server: Any) -> None:
    c = openai.AsyncOpenAI(base_url=tiny_server.http_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    try:
        stream = await c.chat.completions.create(model="tiny_gpt2", stream=True, max_tokens=3,
                                                 messages=[{"role": "user", "content": "hi"}])
        chunks = [chunk async for chunk in stream]
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    finally:
        await c.close()


def test_errors_are_openai_errors(client: Any) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="tiny_embed", messages=[{"role": "user", "content": "x"}])
    assert "not a text-generation model" in str(err.value)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no_such_model", input="x")
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny_gpt2", messages=[])
    assert "messages" in str(err.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny_gpt2", messages=[{"role": "user", "content": "x"}], max_tokens=0)
