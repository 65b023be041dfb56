"""KServe v2 REST on aiohttp, plus ``/models`` and ``/metrics``.

The same repository and models as gRPC; JSON tensors carry flat ``data`` lists.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from aiohttp import web

from modelyard import __version__
from modelyard.protos.tensors import DTYPES, TensorError, as_bytes_array, element_count
from modelyard.server.errors import InvalidInput, ModelyardError, as_modelyard_error
from modelyard.server.frontends.grpc_api import EXTENSIONS
from modelyard.server.frontends.grpc_codec import conform_output
from modelyard.server.metrics import ServerMetrics
from modelyard.server.repository import ModelRepository
from modelyard.server.types import InferRequest, InferResponse

log = logging.getLogger("modelyard.server")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: where an aiohttp app finds its collaborators
REPO_KEY = web.AppKey("repository", ModelRepository)
METRICS_KEY = web.AppKey("metrics", ServerMetrics)
READY_KEY: web.AppKey[Callable[[], bool]] = web.AppKey("is_ready")


def error_json(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The REST twin of the gRPC error mapping: JSON ``{"error": ...}`` with the matching HTTP status."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except ModelyardError as exc:
        return error_json(exc.http, exc.message)
    except Exception as exc:
        log.exception("HTTP %s %s failed", request.method, request.path)
        err = as_modelyard_error(exc)
        return error_json(err.http, err.message)


def json_to_array(entry: dict[str, Any], index: int) -> tuple[str, np.ndarray]:
    """A KServe v2 JSON input tensor -> (name, array); InvalidInput on anything malformed."""
    if not isinstance(entry, dict):
        raise InvalidInput(f"inputs[{index}] must be an object with name, shape, datatype, data")
    name = entry.get("name")
    datatype = entry.get("datatype")
    shape = entry.get("shape")
    data = entry.get("data")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"inputs[{index}].name is required")
    if datatype not in DTYPES:
        raise InvalidInput(f"input '{name}': unknown datatype {datatype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise InvalidInput(f"input '{name}': shape must be a list of non-negative integers")
    if data is None:
        raise InvalidInput(f"input '{name}': data is required")
    flat = np.asarray(data, dtype=object).reshape(-1) if isinstance(data, list) else np.asarray([data], dtype=object)
    if flat.size != element_count(shape):
        raise InvalidInput(f"input '{name}': shape {shape} needs {element_count(shape)} elements, got {flat.size}")
    if datatype == "BYTES":
        return name, as_bytes_array([str(x) if not isinstance(x, bytes | str) else x for x in flat], shape)
    try:
        return name, np.asarray(flat.tolist(), dtype=DTYPES[datatype]).reshape(shape)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidInput(f"input '{name}': data does not fit {datatype}: {exc}") from None


def array_to_json(name: str, arr: np.ndarray, datatype: str) -> dict[str, Any]:
    if datatype == "BYTES":
        data: list[Any] = [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in arr.reshape(-1)]
    else:
        data = arr.reshape(-1).tolist()
    return {"name": name, "datatype": datatype, "shape": list(arr.shape), "data": data}


def response_to_json(resp: InferResponse, cfg: Any) -> dict[str, Any]:
    outputs = []
    for name, value in resp.outputs.items():
        arr, datatype = conform_output(np.asarray(value), cfg, name)
        outputs.append(array_to_json(name, arr, datatype))
    body: dict[str, Any] = {"model_name": resp.model, "model_version": resp.version, "outputs": outputs}
    if resp.id:
        body["id"] = resp.id
    if resp.parameters:
        body["parameters"] = resp.parameters
    return body


async def read_json(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidInput("request body must be a JSON object")
    return body


def decode_json_request(model: str, version: str, body: dict[str, Any]) -> InferRequest:
    inputs_raw = body.get("inputs")
    if not isinstance(inputs_raw, list) or not inputs_raw:
        raise InvalidInput("'inputs' must be a non-empty list")
    inputs: dict[str, np.ndarray] = {}
    try:
        for i, entry in enumerate(inputs_raw):
            name, arr = json_to_array(entry, i)
            inputs[name] = arr
    except TensorError as exc:
        raise InvalidInput(str(exc)) from None
    outputs = body.get("outputs")
    params = body.get("parameters") or {}
    req = InferRequest(
        model=model, version=version, id=str(body.get("id", "")), inputs=inputs,
        parameters=params if isinstance(params, dict) else {},
        outputs=[o["name"] for o in outputs if isinstance(o, dict) and "name" in o] if isinstance(outputs, list) else None,
    )
    timeout_us = req.parameters.get("timeout")
    if isinstance(timeout_us, int) and timeout_us > 0:
        req.deadline = time.monotonic() + timeout_us / 1e6
    return req


def build_app(repository: ModelRepository, metrics: ServerMetrics, is_ready: Callable[[], bool], max_body: int) -> web.Application:
    """The REST application; extra routes (OpenAI adapters...) may be added by the caller."""
    app = web.Application(middlewares=[errors_middleware], client_max_size=max_body)
    app[REPO_KEY] = repository
    app[METRICS_KEY] = metrics
    app[READY_KEY] = is_ready
    repo = repository

    async def live(_: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(_: web.Request) -> web.Response:
        ok = is_ready()
        return web.json_response({"ready": ok}, status=200 if ok else 503)

    async def server_metadata(_: web.Request) -> web.Response:
        return web.json_response({"name": "modelyard", "version": __version__, "extensions": EXTENSIONS})

    def _version(request: web.Request) -> str:
        return request.match_info.get("version", "")

    async def model_metadata(request: web.Request) -> web.Response:
        return web.json_response(repo.metadata(request.match_info["model"], _version(request)))

    async def model_ready(request: web.Request) -> web.Response:
        ok = repo.is_ready(request.match_info["model"], _version(request))
        return web.json_response({"name": request.match_info["model"], "ready": ok}, status=200 if ok else 503)

    async def infer(request: web.Request) -> web.Response:
        mv = repo.get(request.match_info["model"], _version(request))
        body = await read_json(request)
        req = decode_json_request(mv.name, mv.version, body)
        resp = await mv.infer(req)
        return web.json_response(response_to_json(resp, mv.config))

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"models": [
            {"name": e.name, "version": e.version, "state": e.state, "reason": e.reason} for e in repo.index()
        ]})

    async def repo_index(request: web.Request) -> web.Response:
        body = await read_json(request) if request.can_read_body else {}
        return web.json_response([
            {"name": e.name, "version": e.version, "state": e.state, "reason": e.reason}
            for e in repo.index(ready_only=bool(body.get("ready", False)))
        ])

    async def repo_load(request: web.Request) -> web.Response:
        await repo.load(request.match_info["model"])
        return web.json_response({})

    async def repo_unload(request: web.Request) -> web.Response:
        await repo.unload(request.match_info["model"])
        return web.json_response({})

    async def prometheus(_: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Format": "prometheus-text-0.0.4"})

    r = app.router
    r.add_get("/v2/health/live", live)
    r.add_get("/v2/health/ready", ready)
    r.add_get("/v2", server_metadata)
    for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        r.add_get(base, model_metadata)
        r.add_get(base + "/ready", model_ready)
        r.add_post(base + "/infer", infer)
    r.add_post("/v2/repository/index", repo_index)
    r.add_post("/v2/repository/models/{model}/load", repo_load)
    r.add_post("/v2/repository/models/{model}/unload", repo_unload)
    r.add_get("/models", models)
    r.add_get("/metrics", prometheus)
    return app
