"""OpenAI-style REST on the HTTP port: ``/v1/embeddings``, ``/v1/completions``, ``/v1/chat/completions``,
``/v1/models`` -- what the ``openai`` Python client calls.

Thin adapters: each builds ordinary :class:`InferRequest` objects and sends them
through the same model versions (and so the same dynamic batcher, cache and
metrics) as gRPC. A model is offered here when its ``parameters.task`` is
``embedding`` or ``text-generation``. The text input is the model's first BYTES
input; generation takes the token budget from an input named ``MAX_NEW_TOKENS``
(or ``MAX_TOKENS``) when the model declares one. Chat messages become one prompt, a line
``<role>: <content>`` per message and a final ``assistant:`` (these models have no chat template).
Embeddings come back as float lists, or as base64 of little-endian float32 with
``encoding_format: base64`` (what the openai client asks for by default).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from typing import Any

import numpy as np
from aiohttp import web

from modelyard.protos.tensors import as_bytes_array
from modelyard.server.errors import InvalidInput, ModelNotFound
from modelyard.server.frontends.rest_api import REPO_KEY, offload, read_json
from modelyard.server.guard import require_model, visible
from modelyard.server.model import ModelVersion
from modelyard.server.repository import ModelRepository
from modelyard.server.types import InferRequest

EMBEDDING, GENERATION = "embedding", "text-generation"


def _task(mv: ModelVersion) -> str:
    return str(mv.config.parameters.get("task", ""))


def _model(repo: ModelRepository, body: dict[str, Any], task: str) -> ModelVersion:
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise InvalidInput("'model' is required")
    require_model(name)
    mv = repo.get(name, "")
    if _task(mv) != task:
        raise ModelNotFound(f"model '{name}' is not a {task} model (parameters.task is {_task(mv)!r})")
    return mv


def _text_input(mv: ModelVersion) -> str:
    for spec in mv.config.inputs:
        if spec.datatype == "BYTES":
            return spec.name
    raise InvalidInput(f"model '{mv.name}' has no BYTES input to put text in")


def _texts(value: Any, field: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(x, str) for x in value):
        return value
    raise InvalidInput(f"'{field}' must be a string or a non-empty list of strings (token arrays are not supported)")


async def embeddings(request: web.Request) -> web.Response:
    """POST /v1/embeddings: one row per input string, split into chunks of max_batch_size."""
    repo = request.app[REPO_KEY]
    body = await read_json(request)
    mv = _model(repo, body, EMBEDDING)
    texts = _texts(body.get("input"), "input")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise InvalidInput(f"'encoding_format' must be 'float' or 'base64', got {encoding!r}")
    name = _text_input(mv)
    chunk = mv.config.max_batch_size or 1
    # Each chunk is its own request so the batcher can interleave them with other clients' work.
    reqs = [InferRequest(model=mv.name, version=mv.version,
                         inputs={name: as_bytes_array(texts[i:i + chunk], [len(texts[i:i + chunk]), 1])})
            for i in range(0, len(texts), chunk)]
    responses = await asyncio.gather(*(mv.infer(r) for r in reqs))
    tokens = sum(int(resp.parameters.get("prompt_tokens", 0)) for resp in responses)
    rows = [np.asarray(next(iter(resp.outputs.values())), dtype="<f4") for resp in responses]
    data = await offload(sum(r.nbytes for r in rows) > 256 * 1024, _embedding_data, rows, encoding)
    return web.json_response({"object": "list", "data": data, "model": mv.name,
                              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _embedding_data(arrays: list[np.ndarray], encoding: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = []
    for arr in arrays:
        for row in arr.reshape(arr.shape[0], -1):
            value: Any = base64.b64encode(row.tobytes()).decode() if encoding == "base64" else row.tolist()
            data.append({"object": "embedding", "index": len(data), "embedding": value})
    return data


def _generation_request(mv: ModelVersion, prompt: str, max_tokens: int | None) -> InferRequest:
    cfg = mv.config
    batch = [1] if cfg.max_batch_size > 0 else []
    inputs = {_text_input(mv): as_bytes_array([prompt], [*batch, 1])}
    if max_tokens is not None:
        for spec in cfg.inputs:
            if spec.name in ("MAX_NEW_TOKENS", "MAX_TOKENS"):
                inputs[spec.name] = np.array([max_tokens], dtype=np.int32).reshape([*batch, 1])
    return InferRequest(model=mv.name, version=mv.version, inputs=inputs)


def _piece(resp_outputs: dict[str, Any]) -> str:
    for arr in resp_outputs.values():
        a = np.asarray(arr)
        if a.dtype == object:
            return "".join(x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in a.reshape(-1))
    return ""


def _max_tokens(body: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = body.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidInput(f"'{key}' must be a positive integer")
        return value
    return None


def _finish(max_tokens: int | None, count: int) -> str:
    return "length" if max_tokens is not None and count >= max_tokens else "stop"


async def _sse(request: web.Request) -> web.StreamResponse:
    out = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await out.prepare(request)
    return out


async def _send(out: web.StreamResponse, doc: Any) -> None:
    await out.write(f"data: {json.dumps(doc)}\n\n".encode())


async def completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/completions; ``stream: true`` answers with server-sent events, one per token."""
    repo = request.app[REPO_KEY]
    body = await read_json(request)
    mv = _model(repo, body, GENERATION)
    prompts = _texts(body.get("prompt"), "prompt")
    if len(prompts) != 1:
        raise InvalidInput("'prompt' must be a single string")
    max_tokens = _max_tokens(body, "max_tokens")
    req = _generation_request(mv, prompts[0], max_tokens)
    cid = f"cmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())

    def chunk(text: str, finish: str | None) -> dict[str, Any]:
        return {"id": cid, "object": "text_completion", "created": created, "model": mv.name,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}

    if not body.get("stream"):
        pieces: list[str] = []
        async for resp in mv.stream(req):
            pieces.append(_piece(resp.outputs))
        n = len(pieces) if mv.config.decoupled else 0
        body_out = chunk("".join(pieces), _finish(max_tokens, n))
        body_out["usage"] = {"prompt_tokens": 0, "completion_tokens": n, "total_tokens": n}
        return web.json_response(body_out)

    out = await _sse(request)
    count = 0
    try:
        async for resp in mv.stream(req):
            count += 1
            await _send(out, chunk(_piece(resp.outputs), _finish(max_tokens, count) if resp.final else None))
    except Exception as exc:  # headers are sent: report in-band, as OpenAI does
        await _send(out, {"error": {"message": str(exc)}})
    await out.write(b"data: [DONE]\n\n")
    await out.write_eof()
    return out


def chat_prompt(messages: Any) -> str:
    """OpenAI chat messages as one prompt: ``<role>: <content>`` lines, then ``assistant:``."""
    if not isinstance(messages, list) or not messages:
        raise InvalidInput("'messages' must be a non-empty list of {role, content}")
    lines = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidInput(f"messages[{i}] must be an object with a role and a content")
        content = m.get("content")
        if isinstance(content, list):  # content parts: the text ones
            parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
                raise InvalidInput(f"messages[{i}].content: only text parts are supported")
            content = "".join(parts)  # type: ignore[arg-type]
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise InvalidInput(f"messages[{i}].content must be a string or a list of text parts")
        lines.append(f"{m['role']}: {content}")
    lines.append("assistant:")
    return "\n".join(lines)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions; ``stream: true`` answers with ``chat.completion.chunk`` events."""
    repo = request.app[REPO_KEY]
    body = await read_json(request)
    mv = _model(repo, body, GENERATION)
    n = body.get("n", 1)
    if n != 1:
        raise InvalidInput("'n' must be 1 (one choice per request)")
    max_tokens = _max_tokens(body, "max_completion_tokens", "max_tokens")
    req = _generation_request(mv, chat_prompt(body.get("messages")), max_tokens)
    cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    head = {"id": cid, "created": created, "model": mv.name}

    if not body.get("stream"):
        pieces: list[str] = []
        async for resp in mv.stream(req):
            pieces.append(_piece(resp.outputs))
        count = len(pieces) if mv.config.decoupled else 0
        return web.json_response({
            **head, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                         "finish_reason": _finish(max_tokens, count), "logprobs": None}],
            "usage": {"prompt_tokens": 0, "completion_tokens": count, "total_tokens": count},
        })

    def chunk(delta: dict[str, str], finish: str | None) -> dict[str, Any]:
        return {**head, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    out = await _sse(request)
    await _send(out, chunk({"role": "assistant", "content": ""}, None))
    count = 0
    try:
        async for resp in mv.stream(req):
            count += 1
            await _send(out, chunk({"content": _piece(resp.outputs)}, _finish(max_tokens, count) if resp.final else None))
    except Exception as exc:  # headers are sent: report in-band, as OpenAI does
        await _send(out, {"error": {"message": str(exc)}})
    await out.write(b"data: [DONE]\n\n")
    await out.write_eof()
    return out


async def models(request: web.Request) -> web.Response:
    """GET /v1/models: the ready embedding and generation models."""
    repo = request.app[REPO_KEY]
    data: list[dict[str, Any]] = []
    for entry in repo.index(ready_only=True):
        if not visible(entry.name):
            continue
        try:
            mv = repo.get(entry.name, entry.version)
        except Exception:
            continue
        if _task(mv) in (EMBEDDING, GENERATION) and all(d["id"] != mv.name for d in data):
            data.append({"id": mv.name, "object": "model", "created": 0, "owned_by": "modelyard", "task": _task(mv)})
    return web.json_response({"object": "list", "data": data})


def add_openai_routes(app: web.Application) -> None:
    """Mount the adapters on an app from :func:`modelyard.server.frontends.rest_api.build_app`."""
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
