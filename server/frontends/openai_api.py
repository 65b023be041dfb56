"""OpenAI-style REST on the HTTP port: ``/v1/embeddings``, ``/v1/completions``, ``/v1/models``.

Thin adapters: each builds ordinary :class:`InferRequest` objects and sends them
through the same model versions (and so the same dynamic batcher, cache and
metrics) as gRPC. A model is offered here when its ``parameters.task`` is
``embedding`` or ``text-generation``. The text input is the model's first BYTES
input; generation takes the token budget from an input named ``MAX_NEW_TOKENS``
(or ``MAX_TOKENS``) when the model declares one.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import numpy as np
from aiohttp import web

from modelyard.protos.tensors import as_bytes_array
from modelyard.server.errors import InvalidInput, ModelNotFound
from modelyard.server.frontends.rest_api import REPO_KEY, read_json
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
    name = _text_input(mv)
    chunk = mv.config.max_batch_size or 1
    # Each chunk is its own request so the batcher can interleave them with other clients' work.
    reqs = [InferRequest(model=mv.name, version=mv.version,
                         inputs={name: as_bytes_array(texts[i:i + chunk], [len(texts[i:i + chunk]), 1])})
            for i in range(0, len(texts), chunk)]
    responses = await asyncio.gather(*(mv.infer(r) for r in reqs))
    data: list[dict[str, Any]] = []
    tokens = 0
    for resp in responses:
        tokens += int(resp.parameters.get("prompt_tokens", 0))
        arr = next(iter(resp.outputs.values()))
        for row in np.asarray(arr, dtype=np.float32).reshape(arr.shape[0], -1):
            data.append({"object": "embedding", "index": len(data), "embedding": row.tolist()})
    return web.json_response({"object": "list", "data": data, "model": mv.name,
                              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


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


async def completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/completions; ``stream: true`` answers with server-sent events, one per token."""
    repo = request.app[REPO_KEY]
    body = await read_json(request)
    mv = _model(repo, body, GENERATION)
    prompts = _texts(body.get("prompt"), "prompt")
    if len(prompts) != 1:
        raise InvalidInput("'prompt' must be a single string")
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise InvalidInput("'max_tokens' must be a positive integer")
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
        body_out = chunk("".join(pieces), "length" if max_tokens is not None and n >= max_tokens else "stop")
        body_out["usage"] = {"completion_tokens": n}
        return web.json_response(body_out)

    out = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await out.prepare(request)
    count = 0
    try:
        async for resp in mv.stream(req):
            count += 1
            finish = None
            if resp.final:
                finish = "length" if max_tokens is not None and count >= max_tokens else "stop"
            await out.write(f"data: {json.dumps(chunk(_piece(resp.outputs), finish))}\n\n".encode())
    except Exception as exc:  # headers are sent: report in-band, as OpenAI does
        await out.write(f"data: {json.dumps({'error': {'message': str(exc)}})}\n\n".encode())
    await out.write(b"data: [DONE]\n\n")
    await out.write_eof()
    return out


async def models(request: web.Request) -> web.Response:
    """GET /v1/models: the ready embedding and generation models."""
    repo = request.app[REPO_KEY]
    data: list[dict[str, Any]] = []
    for entry in repo.index(ready_only=True):
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
    app.router.add_get("/v1/models", models)
