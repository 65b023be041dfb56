"""KServe v2 REST on aiohttp with Triton's HTTP extensions, plus ``/models``, ``/health`` and ``/metrics``.

The same repository and models as gRPC. What tritonclient.http speaks is served:

* the binary tensor data extension: a JSON header of ``Inference-Header-Content-Length`` bytes,
  then each binary input's bytes in order (``parameters.binary_data_size``); outputs come back
  binary when the output asks (``binary_data``) or the request does (``binary_data_output``);
* ``Content-Encoding: gzip|deflate`` request bodies and ``Accept-Encoding: gzip|deflate`` responses;
* model config and statistics, the repository API, system shared memory;
* every error as ``{"error": "..."}`` with the HTTP status of the same exception class that gives
  the gRPC status (:mod:`modelyard.server.errors`), unknown routes included.

Large bodies are decompressed, parsed, encoded and compressed in a worker thread, never on the loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import gzip
import json
import logging
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from aiohttp import web
from aiohttp.typedefs import Middleware
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from modelyard import __version__
from modelyard.protos.tensors import DTYPES, TensorError, as_bytes_array, check_shape, from_raw, to_raw
from modelyard.server.errors import (
    InvalidInput,
    ModelyardError,
    PayloadTooLarge,
    Unsupported,
    UnsupportedEncoding,
    as_modelyard_error,
)
from modelyard.server.frontends.grpc_api import EXTENSIONS, statistics_response
from modelyard.server.frontends.tensor_io import (
    PendingInput,
    WrittenOutput,
    apply_classification,
    apply_scheduling_params,
    conform_output,
    output_refs,
    read_inputs,
    shm_input,
    shm_output_parameters,
    write_outputs,
)
from modelyard.server.guard import CALLER, HEALTH, METRICS, SERVER, Guard, visible
from modelyard.server.metrics import ServerMetrics
from modelyard.server.model_config import to_proto
from modelyard.server.model_control import FILE_PREFIX, LoadParam, ModelControl
from modelyard.server.repository import ModelRepository
from modelyard.server.shared_memory import CUDA, SYSTEM, SharedMemoryRegistry
from modelyard.server.tracing import request_context
from modelyard.server.types import InferRequest, InferResponse

log = logging.getLogger("modelyard.server")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")

#: where an aiohttp app finds its collaborators
REPO_KEY = web.AppKey("repository", ModelRepository)
METRICS_KEY = web.AppKey("metrics", ServerMetrics)
READY_KEY: web.AppKey[Callable[[], bool]] = web.AppKey("is_ready")
SHM_KEY = web.AppKey("shared_memory", SharedMemoryRegistry)
MAX_BODY_KEY = web.AppKey("max_body", int)

#: the binary tensor data extension's header: the JSON part's length in bytes
INFERENCE_HEADER = "Inference-Header-Content-Length"
#: bodies (or responses) larger than this are decoded / encoded / (de)compressed in a worker thread
INLINE_BYTES = 256 * 1024
ENCODINGS = ("gzip", "deflate")


def error_json(status: int, message: str, openai: bool = False, headers: dict[str, str] | None = None) -> web.Response:
    """KServe's ``{"error": "..."}``; on the OpenAI-style paths OpenAI's ``{"error": {"message", ...}}``."""
    if openai:
        kind = "invalid_request_error" if status < 500 else "server_error"
        return web.json_response({"error": {"message": message, "type": kind, "param": None, "code": status}},
                                 status=status, headers=headers)
    return web.json_response({"error": message}, status=status, headers=headers)


def error_headers(exc: ModelyardError) -> dict[str, str] | None:
    """``Retry-After`` (whole seconds, as HTTP has it) and ``Retry-After-Ms`` for errors with a hint;
    ``WWW-Authenticate`` for 401."""
    if exc.retry_after_ms is not None:
        return {"Retry-After": str(max(1, -(-exc.retry_after_ms // 1000))), "Retry-After-Ms": str(exc.retry_after_ms)}
    if exc.http == 401:
        return {"WWW-Authenticate": 'Bearer realm="modelyard"'}
    return None


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The REST twin of the gRPC error mapping: JSON ``{"error": ...}`` with the matching HTTP status."""
    openai = request.path.startswith("/v1/")
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 404:
            return error_json(404, f"no route {request.method} {request.path}", openai)
        if exc.status == 405:
            return error_json(405, f"method {request.method} is not allowed on {request.path}", openai)
        if exc.status == 413:
            return error_json(413, f"request body larger than the {request.app[MAX_BODY_KEY]} bytes allowed "
                                   "(--max-message-mb)", openai)
        return error_json(exc.status, exc.text or exc.reason, openai)
    except ModelyardError as exc:
        return error_json(exc.http, public_text(request, exc.message), openai, error_headers(exc))
    except Exception as exc:
        log.exception("HTTP %s %s failed", request.method, request.path)
        err = as_modelyard_error(exc)
        return error_json(err.http, public_text(request, err.message), openai)


def public_text(request: web.Request, text: str) -> str:
    """``text`` without any path of the server's disk (a model's own errors may hold one)."""
    repo = request.app.get(REPO_KEY)
    return repo.public_text(text) if repo is not None else text


#: routes that are health checks (``auth.exempt: [health]`` lets them answer without a token)
HEALTH_ROUTES = frozenset({"/v2/health/live", "/v2/health/ready", "/health", "/v2/models/{model}/ready",
                           "/v2/models/{model}/versions/{version}/ready"})


def rest_rule(request: web.Request) -> tuple[str, str, str]:
    """(kind of call, model it names, admin operation) of a routed request (server/guard.py)."""
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else ""
    model = request.match_info.get("model", "")
    if route in HEALTH_ROUTES:
        return HEALTH, model, ""
    if route == "/metrics":
        return METRICS, "", ""
    if route.startswith("/v2/repository/models/"):
        return SERVER, model, "unload" if route.endswith("/unload") else "load"
    if route.startswith(("/v2/systemsharedmemory", "/v2/cudasharedmemory")):
        return SERVER, "", "shared_memory"
    return SERVER, model, ""


def guard_middleware(guard: Guard) -> Middleware:
    """Authenticate, rate-limit and authorize each request before its body is read (server/guard.py);
    the OpenAI routes check their model once they have read it (``guard.require_model``)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        kind, model, operation = rest_rule(request)
        caller = guard.admit(request.headers.get("Authorization"), lambda: request.remote or "", kind)
        reset = CALLER.set(caller)
        try:
            if caller is not None:
                if model:
                    caller.check_model(model)
                if operation:
                    caller.check_admin(operation)
            return await handler(request)
        finally:
            CALLER.reset(reset)

    return middleware


async def offload(big: bool, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a worker thread when ``big``, inline otherwise (a thread hop costs more than small work)."""
    if big:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
    return fn(*args)


# ---------------------------------------------------------------------- bodies


def decompress(data: bytes, encoding: str, limit: int) -> bytes:
    """Undo ``Content-Encoding`` gzip or deflate (zlib; raw deflate is accepted too), at most ``limit`` bytes."""
    attempts = [16 + zlib.MAX_WBITS] if encoding == "gzip" else [zlib.MAX_WBITS, -zlib.MAX_WBITS]
    for i, wbits in enumerate(attempts):
        d = zlib.decompressobj(wbits)
        try:
            out = d.decompress(data, limit + 1)
        except zlib.error as exc:
            if i + 1 < len(attempts):
                continue
            raise InvalidInput(f"request body is not valid {encoding} data (Content-Encoding): {exc}") from None
        if len(out) > limit:
            raise PayloadTooLarge(f"request body decompresses to more than the {limit} bytes allowed (--max-message-mb)")
        if not d.eof:
            raise InvalidInput(f"request body is truncated {encoding} data (Content-Encoding)")
        return out
    raise AssertionError("unreachable")


async def read_body(request: web.Request) -> bytes:
    """The request body, decompressed as its ``Content-Encoding`` says (415 for an encoding not served)."""
    data = await request.read()
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding in ("", "identity"):
        return data
    if encoding not in ENCODINGS:
        raise UnsupportedEncoding(f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or identity")
    return await offload(len(data) > INLINE_BYTES // 4, decompress, data, encoding, request.app[MAX_BODY_KEY])


def parse_json(data: bytes | memoryview, what: str = "request body") -> dict[str, Any]:
    try:
        body = json.loads(bytes(data))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidInput(f"{what} nests arrays or objects too deeply") from None
    if not isinstance(body, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    return body


async def read_json(request: web.Request, *, empty_ok: bool = False) -> dict[str, Any]:
    data = await read_body(request)
    if empty_ok and not data.strip():
        return {}
    return await offload(len(data) > INLINE_BYTES, parse_json, data)


def accepted_encoding(header: str | None) -> str | None:
    """gzip or deflate when ``Accept-Encoding`` allows one (gzip first), else None (identity)."""
    if not header:
        return None
    weights: dict[str, float] = {}
    for part in header.split(","):
        token, _, params = part.strip().partition(";")
        q = 1.0
        for p in params.split(";"):
            k, _, v = p.strip().partition("=")
            if k == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        weights[token.strip().lower()] = q
    for enc in ENCODINGS:
        if weights.get(enc, weights.get("*", 0.0)) > 0:
            return enc
    return None


def compress(data: bytes, encoding: str) -> bytes:
    return gzip.compress(data, compresslevel=1) if encoding == "gzip" else zlib.compress(data, 1)


#: smaller bodies go out uncompressed whatever Accept-Encoding says (not worth the CPU)
MIN_COMPRESS_BYTES = 512


async def respond(request: web.Request, body: bytes, content_type: str = "application/json",
                  headers: dict[str, str] | None = None, status: int = 200, *, compressible: bool = False) -> web.Response:
    """A response; ``compressible`` ones (inference results, as in Triton) are compressed as the client's
    ``Accept-Encoding`` allows when they are 512 bytes or more. Other documents never are: HTTP clients
    send ``Accept-Encoding: gzip, deflate`` by default, and tritonclient.http.aio decompresses infer only."""
    out = dict(headers or {})
    encoding = accepted_encoding(request.headers.get("Accept-Encoding")) if compressible else None
    if encoding is not None and len(body) >= MIN_COMPRESS_BYTES:
        body = await offload(len(body) > INLINE_BYTES // 4, compress, body, encoding)
        out["Content-Encoding"] = encoding
    out["Content-Type"] = content_type
    return web.Response(body=body, status=status, headers=out)


async def respond_json(request: web.Request, doc: Any, status: int = 200) -> web.Response:
    return await respond(request, json.dumps(doc).encode(), status=status)


def raw_handle(value: Any) -> bytes:
    """The bytes of a CUDA shared memory register body's ``"raw_handle": {"b64": "..."}``."""
    encoded = value.get("b64") if isinstance(value, dict) else None
    if not isinstance(encoded, str):
        raise InvalidInput('raw_handle must be {"b64": "<base64 of the cudaIpcMemHandle_t>"}')
    try:
        return base64.b64decode(encoded, validate=True)
    except binascii.Error as exc:
        raise InvalidInput(f"raw_handle: invalid base64: {exc}") from None


# ---------------------------------------------------------------------- tensors


def json_to_array(entry: dict[str, Any], index: int, max_elements: int | None = None) -> tuple[str, np.ndarray]:
    """A KServe v2 JSON input tensor -> (name, array); InvalidInput on anything malformed."""
    if not isinstance(entry, dict):
        raise InvalidInput(f"inputs[{index}] must be an object with name, shape, datatype, data")
    name = entry.get("name")
    datatype = entry.get("datatype")
    shape = entry.get("shape")
    data = entry.get("data")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"inputs[{index}].name is required")
    check_tensor_header(name, datatype, shape)
    try:
        count = check_shape(shape, name, max_elements)
    except TensorError as exc:
        raise InvalidInput(str(exc)) from None
    if data is None:
        raise InvalidInput(f"input '{name}': data is required (or parameters binary_data_size / shared_memory_region)")
    flat = np.asarray(data, dtype=object).reshape(-1) if isinstance(data, list) else np.asarray([data], dtype=object)
    if flat.size != count:
        raise InvalidInput(f"input '{name}': shape {shape} needs {count} elements, got {flat.size}")
    if datatype == "BYTES":
        return name, as_bytes_array([str(x) if not isinstance(x, bytes | str) else x for x in flat], shape)
    try:
        return name, np.asarray(flat.tolist(), dtype=DTYPES[datatype]).reshape(shape)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidInput(f"input '{name}': data does not fit {datatype}: {exc}") from None


def check_tensor_header(name: str, datatype: Any, shape: Any) -> None:
    if datatype not in DTYPES:
        raise InvalidInput(f"input '{name}': unknown datatype {datatype!r}")
    if (not isinstance(shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise InvalidInput(f"input '{name}': shape must be a list of non-negative integers")


def array_to_json(name: str, arr: np.ndarray, datatype: str) -> dict[str, Any]:
    if datatype == "BYTES":
        data: list[Any] = [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in arr.reshape(-1)]
    else:
        data = arr.reshape(-1).tolist()
    return {"name": name, "datatype": datatype, "shape": list(arr.shape), "data": data}


def header_length(value: str | None, body_size: int) -> int | None:
    """The ``Inference-Header-Content-Length`` value, checked against the body (None when absent)."""
    if value is None:
        return None
    text = value.strip()
    if not (text.isascii() and text.isdigit()):
        raise InvalidInput(f"{INFERENCE_HEADER} must be a non-negative integer, got {value[:40]!r}")
    n = int(text)
    if n > body_size:
        raise InvalidInput(f"{INFERENCE_HEADER} {n} is past the end of the {body_size}-byte body")
    return n


@dataclass(slots=True)
class DecodedInfer:
    request: InferRequest
    pending: list[PendingInput] = field(default_factory=list)
    #: outputs in binary form unless an output says otherwise (``binary_data_output``)
    binary_default: bool = False


def _binary_size(params: dict[str, Any], name: str) -> int | None:
    size = params.get("binary_data_size")
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InvalidInput(f"input '{name}': parameters.binary_data_size must be a non-negative integer, got {size!r}")
    return size


def decode_infer(body: bytes, header: str | None, model: str, version: str,
                 max_elements: int | None = None) -> DecodedInfer:
    """A KServe v2 inference request, JSON or JSON + binary tensors (pure: runs in a worker thread when big).
    Shapes are checked against ``max_elements`` (the body size limit) before anything is allocated."""
    n = header_length(header, len(body))
    view = memoryview(body)
    doc = parse_json(view if n is None else view[:n], "request body" if n is None else "inference header")
    binary = view[len(view):] if n is None else view[n:]
    inputs_raw = doc.get("inputs")
    if not isinstance(inputs_raw, list) or not inputs_raw:
        raise InvalidInput("'inputs' must be a non-empty list")
    inputs: dict[str, np.ndarray] = {}
    pending: list[PendingInput] = []
    pos = 0
    try:
        for i, entry in enumerate(inputs_raw):
            params = entry.get("parameters") if isinstance(entry, dict) else None
            if params is not None and not isinstance(params, dict):
                raise InvalidInput(f"inputs[{i}].parameters must be an object")
            name = entry.get("name") if isinstance(entry, dict) else None
            if isinstance(name, str) and (name in inputs or any(p.name == name for p in pending)):
                raise InvalidInput(f"input '{name}' given twice")
            size = _binary_size(params, str(name)) if params else None
            ref = shm_input(str(name), entry.get("datatype"), entry.get("shape"), params) if params else None
            if size is None and ref is None:
                name, arr = json_to_array(entry, i, max_elements)
                inputs[name] = arr
                continue
            if not isinstance(name, str) or not name:
                raise InvalidInput(f"inputs[{i}].name is required")
            if "data" in entry:
                raise InvalidInput(f"input '{name}': 'data' and binary_data_size/shared_memory_region are both set")
            if size is not None and ref is not None:
                raise InvalidInput(f"input '{name}': binary_data_size and shared_memory_region are both set")
            if ref is not None:
                pending.append(ref)
                continue
            assert size is not None
            check_tensor_header(name, entry.get("datatype"), entry.get("shape"))
            if pos + size > len(binary):
                raise InvalidInput(f"input '{name}': binary_data_size {size} is past the end of the binary data "
                                   f"({len(binary) - pos} bytes left after the {INFERENCE_HEADER} header)")
            inputs[name] = from_raw(binary[pos:pos + size], entry["datatype"], entry["shape"], name, max_elements)
            pos += size
    except TensorError as exc:
        raise InvalidInput(str(exc)) from None
    if pos != len(binary):
        raise InvalidInput(f"{len(binary) - pos} bytes of binary data follow the inputs' binary_data_size "
                           f"(check {INFERENCE_HEADER})")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInput("'parameters' must be an object")
    binary_default = params.pop("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise InvalidInput(f"parameter binary_data_output must be true or false, got {binary_default!r}")
    req = InferRequest(model=model, version=version, id=str(doc.get("id", "")), inputs=inputs, parameters=params)
    outputs = doc.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                    for o in outputs):
            raise InvalidInput("'outputs' must be a list of objects with a name")
        req.outputs = [o["name"] for o in outputs]
        out_params: dict[str, dict[str, Any]] = {}
        for o in outputs:
            p = o.get("parameters")
            if p is None:
                continue
            if not isinstance(p, dict):
                raise InvalidInput(f"output '{o['name']}': parameters must be an object")
            out_params[o["name"]] = p
        req.output_parameters = out_params
    apply_scheduling_params(req)
    return DecodedInfer(req, pending, binary_default)


def encode_infer(resp: InferResponse, cfg: Any, decoded: DecodedInfer,
                 written: dict[str, WrittenOutput]) -> tuple[bytes, bytes | None]:
    """(JSON, binary tail or None) of a response (pure: runs in a worker thread when big)."""
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    out_params = decoded.request.output_parameters
    for name, value in resp.outputs.items():
        done = written.get(name)
        if done is not None:
            outputs.append({"name": name, "datatype": done.datatype, "shape": done.shape,
                            "parameters": shm_output_parameters(done)})
            continue
        arr, datatype = conform_output(np.asarray(value), cfg, name)
        binary = out_params.get(name, {}).get("binary_data", decoded.binary_default)
        if binary:
            raw = to_raw(arr)
            chunks.append(raw)
            outputs.append({"name": name, "datatype": datatype, "shape": list(arr.shape),
                            "parameters": {"binary_data_size": len(raw)}})
        else:
            outputs.append(array_to_json(name, arr, datatype))
    doc: dict[str, Any] = {"model_name": resp.model, "model_version": resp.version, "outputs": outputs}
    if resp.id:
        doc["id"] = resp.id
    if resp.parameters:
        doc["parameters"] = {k: (v.item() if hasattr(v, "item") else v) for k, v in resp.parameters.items()}
    head = json.dumps(doc).encode()
    return head, (b"".join(chunks) if chunks else None)


def load_parameters(raw: Any) -> dict[str, LoadParam]:
    """A load request's ``parameters`` as tritonclient.http sends them: ``config`` a JSON string, each
    ``file:<path>`` its content in base64."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidInput("'parameters' must be an object")
    out: dict[str, LoadParam] = {}
    for key, value in raw.items():
        if key.startswith(FILE_PREFIX):
            if not isinstance(value, str):
                raise InvalidInput(f"load parameter '{key}' must be the file's content in base64")
            try:
                out[key] = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidInput(f"load parameter '{key}' is not valid base64") from None
        elif isinstance(value, str | bool | int) and not isinstance(value, float):
            out[key] = value
        else:
            raise InvalidInput(f"Unrecognized load parameter '{key}' with type '{type(value).__name__}'")
    return out


def proto_json(msg: Message) -> dict[str, Any]:
    """A protobuf message as Triton's HTTP API writes it: field names as declared, enums by name,
    64-bit integers as JSON numbers (protobuf's own JSON writes them as strings), scalars with their
    default values included; unset sub-messages and unset oneof members are left out."""
    out: dict[str, Any] = {}
    for fd in msg.DESCRIPTOR.fields:
        oneof = fd.containing_oneof
        if oneof is not None and msg.WhichOneof(oneof.name) != fd.name:
            continue
        singular_message = fd.type == FieldDescriptor.TYPE_MESSAGE and not _repeated(fd)
        if singular_message and not msg.HasField(fd.name):
            continue
        out[fd.name] = _proto_value(fd, getattr(msg, fd.name))
    return out


def _repeated(fd: FieldDescriptor) -> bool:
    # protobuf >= 6.32 has is_repeated and deprecates label; 6.31 has only label
    flag = getattr(fd, "is_repeated", None)
    return bool(flag) if flag is not None else fd.label == FieldDescriptor.LABEL_REPEATED


def _proto_value(fd: FieldDescriptor, value: Any) -> Any:
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        vfd = fd.message_type.fields_by_name["value"]
        return {k: _proto_scalar(vfd, v) for k, v in value.items()}
    if _repeated(fd):
        return [_proto_scalar(fd, v) for v in value]
    return _proto_scalar(fd, value)


def _proto_scalar(fd: FieldDescriptor, value: Any) -> Any:
    if fd.type == FieldDescriptor.TYPE_MESSAGE:
        return proto_json(value)
    if fd.type == FieldDescriptor.TYPE_ENUM:
        return fd.enum_type.values_by_number[value].name if value in fd.enum_type.values_by_number else value
    if fd.type == FieldDescriptor.TYPE_BYTES:
        return value.decode("utf-8", "replace")
    return value


# ---------------------------------------------------------------------- the app


def build_app(repository: ModelRepository, metrics: ServerMetrics, is_ready: Callable[[], bool], max_body: int,
              shm: SharedMemoryRegistry | None = None, guard: Guard | None = None, *,
              control: ModelControl | None = None, server_name: str = "modelyard") -> web.Application:
    """The REST application; extra routes (OpenAI adapters, /health...) may be added by the caller.
    With ``guard``, every request is authenticated, rate-limited and authorized (server/guard.py)."""
    # request_context first: the request id (and span) cover the error mapping's log lines too
    middlewares: list[Middleware] = [request_context, errors_middleware]
    if guard is not None:
        middlewares.append(guard_middleware(guard))
    app = web.Application(middlewares=middlewares, client_max_size=max_body)
    app[REPO_KEY] = repository
    app[METRICS_KEY] = metrics
    app[READY_KEY] = is_ready
    app[MAX_BODY_KEY] = max_body
    registry = app[SHM_KEY] = shm if shm is not None else SharedMemoryRegistry()
    repo = repository
    #: load / unload requests (the server's --model-control-mode; default: allowed)
    ctl = control if control is not None else ModelControl(repository)

    async def live(request: web.Request) -> web.Response:
        return await respond_json(request, {"live": True})

    async def ready(request: web.Request) -> web.Response:
        ok = is_ready()
        return await respond_json(request, {"ready": ok}, status=200 if ok else 503)

    async def server_metadata(request: web.Request) -> web.Response:
        return await respond_json(request, {"name": server_name, "version": __version__, "extensions": EXTENSIONS})

    def _version(request: web.Request) -> str:
        return request.match_info.get("version", "")

    async def model_metadata(request: web.Request) -> web.Response:
        return await respond_json(request, repo.metadata(request.match_info["model"], _version(request)))

    async def model_config(request: web.Request) -> web.Response:
        mv = repo.get(request.match_info["model"], _version(request))
        return await respond_json(request, proto_json(to_proto(mv.config)))

    async def model_stats(request: web.Request) -> web.Response:
        stats = statistics_response(repo, request.match_info.get("model", ""), _version(request))
        return await respond_json(request, proto_json(stats) or {"model_stats": []})

    async def model_ready(request: web.Request) -> web.Response:
        ok = repo.is_ready(request.match_info["model"], _version(request))
        return await respond_json(request, {"name": request.match_info["model"], "ready": ok},
                                  status=200 if ok else 503)

    async def infer(request: web.Request) -> web.Response:
        mv = repo.get(request.match_info["model"], _version(request))
        body = await read_body(request)
        decoded = await offload(len(body) > INLINE_BYTES, decode_infer, body,
                                request.headers.get(INFERENCE_HEADER), mv.name, mv.version, max_body)
        req = decoded.request
        if decoded.pending:
            await read_inputs(registry, req, decoded.pending)
        refs = output_refs(registry, req) if req.output_parameters else {}
        resp = apply_classification(req, await mv.infer(req), mv.config, mv.labels)
        written = await write_outputs(registry, resp, mv.config, refs) if refs else {}
        big = sum(getattr(v, "nbytes", 0) for v in resp.outputs.values()) > INLINE_BYTES
        head, tail = await offload(big, encode_infer, resp, mv.config, decoded, written)
        if tail is None:
            return await respond(request, head, compressible=True)
        return await respond(request, head + tail, "application/octet-stream", {INFERENCE_HEADER: str(len(head))},
                             compressible=True)

    async def models(request: web.Request) -> web.Response:
        return await respond_json(request, {"models": [
            {"name": e.name, "version": e.version, "state": e.state, "reason": e.reason} for e in repo.index()
            if visible(e.name)
        ]})

    async def repo_index(request: web.Request) -> web.Response:
        body = await read_json(request, empty_ok=True)
        return await respond_json(request, [
            {"name": e.name, "version": e.version, "state": e.state, "reason": e.reason}
            for e in repo.index(ready_only=bool(body.get("ready", False))) if visible(e.name)
        ])

    async def repo_load(request: web.Request) -> web.Response:
        body = await read_json(request, empty_ok=True)
        await ctl.load(request.match_info["model"], load_parameters(body.get("parameters")))
        return await respond_json(request, {})

    async def repo_unload(request: web.Request) -> web.Response:
        body = await read_json(request, empty_ok=True)
        params = body.get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidInput("'parameters' must be an object")
        dependents = params.get("unload_dependents", False)
        if not isinstance(dependents, bool):
            raise InvalidInput(f"Unable to parse 'unload_dependents': expected true or false, got {dependents!r}")
        await ctl.unload(request.match_info["model"], dependents)
        return await respond_json(request, {})

    async def shm_status(request: web.Request) -> web.Response:
        return await respond_json(request, registry.status(SYSTEM, request.match_info.get("region", "")))

    async def shm_register(request: web.Request) -> web.Response:
        body = await read_json(request)
        registry.register_system(request.match_info["region"], body.get("key"), body.get("offset", 0),
                                 body.get("byte_size"))
        return await respond_json(request, {})

    async def shm_unregister(request: web.Request) -> web.Response:
        await registry.unregister(SYSTEM, request.match_info.get("region", ""))
        return await respond_json(request, {})

    async def cuda_shm_status(request: web.Request) -> web.Response:
        return await respond_json(request, registry.status(CUDA, request.match_info.get("region", "")))

    async def cuda_shm_register(request: web.Request) -> web.Response:
        body = await read_json(request)
        await registry.register_cuda(request.match_info["region"], raw_handle(body.get("raw_handle")),
                                     body.get("device_id", 0), body.get("byte_size"))
        return await respond_json(request, {})

    async def cuda_shm_unregister(request: web.Request) -> web.Response:
        await registry.unregister(CUDA, request.match_info.get("region", ""))
        return await respond_json(request, {})

    async def unsupported(request: web.Request) -> web.Response:
        raise Unsupported(f"{request.path}: tracing and log settings are not supported by modelyard")

    async def prometheus(_: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Format": "prometheus-text-0.0.4"})

    r = app.router
    r.add_get("/v2/health/live", live)
    r.add_get("/v2/health/ready", ready)
    r.add_get("/v2", server_metadata)
    r.add_get("/v2/models/stats", model_stats)
    for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        r.add_get(base, model_metadata)
        r.add_get(base + "/ready", model_ready)
        r.add_get(base + "/config", model_config)
        r.add_get(base + "/stats", model_stats)
        r.add_post(base + "/infer", infer)
        r.add_route("*", base + "/trace/setting", unsupported)
    r.add_post("/v2/repository/index", repo_index)
    r.add_post("/v2/repository/models/{model}/load", repo_load)
    r.add_post("/v2/repository/models/{model}/unload", repo_unload)
    r.add_get("/v2/systemsharedmemory/status", shm_status)
    r.add_get("/v2/systemsharedmemory/region/{region}/status", shm_status)
    r.add_post("/v2/systemsharedmemory/region/{region}/register", shm_register)
    r.add_post("/v2/systemsharedmemory/region/{region}/unregister", shm_unregister)
    r.add_post("/v2/systemsharedmemory/unregister", shm_unregister)
    r.add_get("/v2/cudasharedmemory/status", cuda_shm_status)
    r.add_get("/v2/cudasharedmemory/region/{region}/status", cuda_shm_status)
    r.add_post("/v2/cudasharedmemory/region/{region}/register", cuda_shm_register)
    r.add_post("/v2/cudasharedmemory/region/{region}/unregister", cuda_shm_unregister)
    r.add_post("/v2/cudasharedmemory/unregister", cuda_shm_unregister)
    for path in ("/v2/trace/setting", "/v2/logging"):
        r.add_route("*", path, unsupported)
    r.add_get("/models", models)
    r.add_get("/metrics", prometheus)
    return app
