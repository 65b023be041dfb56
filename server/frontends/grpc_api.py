"""Thin grpc.aio servicer for ``inference.GRPCInferenceService``.

Every method translates protobuf to plain objects, calls the repository/model,
and translates back. Errors are mapped to status codes in one place, :func:`rpc`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.message import DecodeError

from modelyard import __version__
from modelyard.protos import grpc_service_pb2 as pb
from modelyard.protos import grpc_service_pb2_grpc as pb_grpc
from modelyard.protos.params import parameter_value
from modelyard.security.rules import ANY_CALLER, RULES
from modelyard.server.errors import ModelyardError, as_modelyard_error
from modelyard.server.frontends.grpc_codec import decode_request, encode_response
from modelyard.server.frontends.tensor_io import (
    PendingInput,
    apply_classification,
    output_refs,
    read_inputs,
    write_outputs,
)
from modelyard.server.guard import CALLER, SERVER, Guard, visible
from modelyard.server.model import ModelVersion
from modelyard.server.model_config import to_proto
from modelyard.server.model_control import LoadParam, ModelControl
from modelyard.server.repository import ModelRepository
from modelyard.server.shared_memory import CUDA, SYSTEM, SharedMemoryRegistry
from modelyard.server.tracing import enter_grpc, exit_grpc
from modelyard.server.types import InferRequest

log = logging.getLogger("modelyard.server")

#: requests of one ModelStreamInfer call handled at once; the next is read when one finishes
STREAM_MAX_INFLIGHT = 64
#: responses of one stream waiting for the client to read them
STREAM_MAX_BUFFERED = 256

EXTENSIONS = ["classification", "model_repository", "model_configuration", "statistics", "binary_tensor_data",
              "system_shared_memory", "cuda_shared_memory"]

T = TypeVar("T")


def _stats_message(mv: ModelVersion) -> pb.ModelStatistics:
    s = mv.stats
    msg = pb.ModelStatistics(
        name=mv.name,
        version=mv.version,
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
    )
    st = msg.inference_stats
    for field in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss"):
        d = getattr(s, field)
        getattr(st, field).count = d.count
        getattr(st, field).ns = d.ns
    for size in sorted(s.batches):
        b = s.batches[size]
        bm = msg.batch_stats.add(batch_size=size)
        for field in ("compute_input", "compute_infer", "compute_output"):
            getattr(bm, field).count = getattr(b, field).count
            getattr(bm, field).ns = getattr(b, field).ns
    return msg


#: the message of calls refused during shutdown (UNAVAILABLE: nothing was processed, retry elsewhere)
SHUTTING_DOWN = "the server is shutting down; the request was not processed (retry on another replica)"


def statistics_response(repo: ModelRepository, name: str = "", version: str = "") -> pb.ModelStatisticsResponse:
    """Triton's ModelStatistics for one version, every version of a model, or every model (gRPC and REST;
    every model: those the caller may see)."""
    resp = pb.ModelStatisticsResponse()
    if name:
        if version:
            resp.model_stats.append(_stats_message(repo.get(name, version)))
        else:
            versions = repo.versions(name)
            for v in sorted(versions, key=int):
                resp.model_stats.append(_stats_message(versions[v]))
    else:
        for model in sorted(repo.models):
            if not visible(model):
                continue
            versions = repo.models[model]
            for v in sorted(versions, key=int):
                resp.model_stats.append(_stats_message(versions[v]))
    return resp


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The KServe v2 / Triton gRPC API over a :class:`ModelRepository`."""

    def __init__(self, repository: ModelRepository, is_ready: Callable[[], bool],
                 shm: SharedMemoryRegistry | None = None, guard: Guard | None = None,
                 max_elements: int | None = None, *, control: ModelControl | None = None,
                 server_name: str = "modelyard") -> None:
        self.repo = repository
        self.server_name = server_name
        #: load / unload requests (the server's --model-control-mode; default: allowed)
        self.control = control if control is not None else ModelControl(repository)
        #: the most elements an input's shape may have (the message size limit; None: int64)
        self.max_elements = max_elements
        #: tokens, allow lists and rate limits (None: every call is let in)
        self.guard = guard
        self._is_ready = is_ready
        self.shm = shm if shm is not None else SharedMemoryRegistry()
        #: set during shutdown: new calls are answered UNAVAILABLE (never processed, so a balancer retries
        #: them elsewhere) instead of being left for grpc to cancel when the server stops
        self.refusing = False
        #: calls inside a handler now, and when the last one arrived (the shutdown waits for quiet)
        self.active = 0
        self.last_arrival = 0.0

    def public(self, exc: ModelyardError) -> ModelyardError:
        """``exc`` without any path of the server's disk in its message (a model's own errors may hold one)."""
        exc.message = self.repo.public_text(exc.message)
        return exc

    # --------------------------------------------------------------- health
    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._is_ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.repo.is_ready(request.name, request.version))

    # --------------------------------------------------------------- metadata
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=self.server_name, version=__version__, extensions=EXTENSIONS)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        return pb.ModelMetadataResponse(**self.repo.metadata(request.name, request.version))

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext) -> pb.ModelConfigResponse:
        mv = self.repo.get(request.name, request.version)
        return pb.ModelConfigResponse(config=to_proto(mv.config))

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext) -> pb.ModelStatisticsResponse:
        return statistics_response(self.repo, request.name, request.version)

    # --------------------------------------------------------------- repository
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext) -> pb.RepositoryIndexResponse:
        resp = pb.RepositoryIndexResponse()
        for e in self.repo.index(ready_only=request.ready):
            if visible(e.name):
                resp.models.add(name=e.name, version=e.version, state=e.state, reason=e.reason)
        return resp

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext) -> pb.RepositoryModelLoadResponse:
        params = {key: _param(value) for key, value in request.parameters.items()}
        await self.control.load(request.model_name, params)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext) -> pb.RepositoryModelUnloadResponse:
        dependents = request.parameters.get("unload_dependents")
        await self.control.unload(request.model_name, bool(dependents is not None and dependents.bool_param))
        return pb.RepositoryModelUnloadResponse()

    # --------------------------------------------------------------- inference
    async def _decode(self, msg: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> InferRequest:
        pending: list[PendingInput] = []
        req = decode_request(msg, context.time_remaining(), pending, self.max_elements)
        if pending:
            await read_inputs(self.shm, req, pending)
        return req

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        mv = self.repo.get(request.model_name, request.model_version)
        req = await self._decode(request, context)
        refs = output_refs(self.shm, req) if req.output_parameters else {}
        resp = apply_classification(req, await mv.infer(req), mv.config, mv.labels)
        written = await write_outputs(self.shm, resp, mv.config, refs) if refs else None
        return encode_response(resp, mv.config, written=written)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Bidirectional stream: requests are handled concurrently; errors come back in-band
        (``error_message``) and the stream carries on, as Triton does.

        Requests of one sequence (same model and ``sequence_id``) reach the model's sequence
        batcher in the order they arrived on the stream: each waits until the one before it
        has been queued (not computed), so a client may pipeline a whole sequence."""
        # Bounded both ways: a client that pipelines requests without reading responses stops
        # being read (HTTP/2 flow control pushes back) instead of growing server memory.
        out: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue(maxsize=STREAM_MAX_BUFFERED)
        handlers: set[asyncio.Task[None]] = set()
        slots = asyncio.Semaphore(STREAM_MAX_INFLIGHT)

        caller = CALLER.get()
        #: (model, sequence id) -> set once the latest request of that sequence has been queued
        queued: dict[tuple[str, Any], asyncio.Event] = {}
        #: a sequence request's place: its key, the event of the request before it (None: first), its own event
        Turn = tuple[tuple[str, Any], asyncio.Event | None, asyncio.Event]

        def let_next_go(turn: Turn) -> None:
            key, _, mine = turn
            if not mine.is_set():
                mine.set()
                if queued.get(key) is mine:
                    del queued[key]

        async def handle(msg: pb.ModelInferRequest, turn: Turn | None = None) -> None:
            try:
                if caller is not None:  # every message is a request: its model checked, its client's bucket taken
                    caller.check_model(msg.model_name)
                    caller.take()
                mv = self.repo.get(msg.model_name, msg.model_version)
                req = await self._decode(msg, context)
                refs = output_refs(self.shm, req) if req.output_parameters else {}
                if turn is not None:
                    if turn[1] is not None:
                        await turn[1].wait()
                    # no await between this and the request being queued by mv.stream: the next
                    # request of the sequence runs only after this task yields
                    let_next_go(turn)
                async for resp in mv.stream(req):
                    resp = apply_classification(req, resp, mv.config, mv.labels)
                    written = await write_outputs(self.shm, resp, mv.config, refs) if refs else None
                    await out.put(pb.ModelStreamInferResponse(infer_response=encode_response(
                        resp, mv.config, decoupled=mv.config.decoupled, written=written)))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                err = as_modelyard_error(exc)
                if not isinstance(exc, ModelyardError):
                    log.exception("stream request failed")
                await out.put(pb.ModelStreamInferResponse(
                    error_message=f"{err.code.name}: {self.public(err).message}",
                    infer_response=pb.ModelInferResponse(model_name=msg.model_name, model_version=msg.model_version, id=msg.id),
                ))
            finally:
                if turn is not None:  # failed before it was queued: the next one may go all the same
                    let_next_go(turn)

        async def read() -> None:
            try:
                async for msg in request_iterator:
                    await slots.acquire()
                    seq = msg.parameters.get("sequence_id") if msg.parameters else None
                    if seq is not None:
                        key = (msg.model_name, parameter_value(seq))
                        mine = asyncio.Event()
                        task = asyncio.create_task(handle(msg, (key, queued.get(key), mine)))
                        queued[key] = mine
                    else:
                        task = asyncio.create_task(handle(msg))
                    handlers.add(task)
                    task.add_done_callback(handlers.discard)
                    task.add_done_callback(lambda _: slots.release())
                while handlers:
                    await asyncio.gather(*list(handlers), return_exceptions=True)
            finally:
                await out.put(None)

        reader = asyncio.create_task(read())
        try:
            while True:
                item = await out.get()
                if item is None:
                    break
                yield item
        finally:
            reader.cancel()
            for task in list(handlers):
                task.cancel()

    # --------------------------------------------------------------- system and CUDA shared memory
    async def SystemSharedMemoryRegister(self, request: pb.SystemSharedMemoryRegisterRequest,
                                         context: grpc.aio.ServicerContext) -> pb.SystemSharedMemoryRegisterResponse:
        self.shm.register_system(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(self, request: pb.SystemSharedMemoryUnregisterRequest,
                                           context: grpc.aio.ServicerContext) -> pb.SystemSharedMemoryUnregisterResponse:
        await self.shm.unregister(SYSTEM, request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    async def SystemSharedMemoryStatus(self, request: pb.SystemSharedMemoryStatusRequest,
                                       context: grpc.aio.ServicerContext) -> pb.SystemSharedMemoryStatusResponse:
        return self._regions(SYSTEM, request.name, pb.SystemSharedMemoryStatusResponse())

    async def CudaSharedMemoryRegister(self, request: pb.CudaSharedMemoryRegisterRequest,
                                       context: grpc.aio.ServicerContext) -> pb.CudaSharedMemoryRegisterResponse:
        await self.shm.register_cuda(request.name, request.raw_handle, request.device_id, request.byte_size)
        return pb.CudaSharedMemoryRegisterResponse()

    async def CudaSharedMemoryUnregister(self, request: pb.CudaSharedMemoryUnregisterRequest,
                                         context: grpc.aio.ServicerContext) -> pb.CudaSharedMemoryUnregisterResponse:
        await self.shm.unregister(CUDA, request.name)
        return pb.CudaSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryStatus(self, request: pb.CudaSharedMemoryStatusRequest,
                                     context: grpc.aio.ServicerContext) -> pb.CudaSharedMemoryStatusResponse:
        return self._regions(CUDA, request.name, pb.CudaSharedMemoryStatusResponse())

    def _regions(self, kind: str, name: str, resp: Any) -> Any:
        """``resp`` (a System/CudaSharedMemoryStatusResponse) with the status of ``kind``'s regions."""
        for region in self.shm.status(kind, name):
            resp.regions[region["name"]].CopyFrom(type(resp).RegionStatus(**region))
        return resp

    # --------------------------------------------------------------- not implemented
    async def _unsupported(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "tracing and log settings are not supported by modelyard")

    TraceSetting = LogSettings = _unsupported


def _param(value: pb.ModelRepositoryParameter) -> LoadParam:
    """A ModelRepositoryParameter's value (bool, int64, string or bytes)."""
    choice = value.WhichOneof("parameter_choice")
    return getattr(value, choice) if choice is not None else b""


def authorization(context: grpc.aio.ServicerContext) -> str | None:
    """The ``authorization`` metadata of a call (None when absent)."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode("latin-1")
    return None


async def abort(context: grpc.aio.ServicerContext, exc: ModelyardError) -> NoReturn:
    """End the call with the error's status and message, and its ``retry-after-ms`` trailer when it has a hint."""
    trailers = (("retry-after-ms", str(exc.retry_after_ms)),) if exc.retry_after_ms is not None else ()
    await context.abort(exc.code, exc.message, trailers)
    raise AssertionError("unreachable")  # context.abort raises


def guarded(behavior: Callable[..., Any], guard: Guard | None, kind: str) -> Callable[..., Any]:
    """A grpc.aio handler (coroutine or async generator) behind ``guard.admit`` for calls of ``kind``
    (the services other than GRPCInferenceService: health, modelyard.Health, reflection)."""
    if guard is None:
        return behavior

    async def admit(context: grpc.aio.ServicerContext) -> None:
        try:
            CALLER.set(guard.admit(authorization(context), context.peer, kind))
        except ModelyardError as exc:
            await abort(context, exc)

    if inspect.isasyncgenfunction(behavior):
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await admit(context)
            async for item in behavior(request, context):
                yield item

        return stream

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await admit(context)
        return await behavior(request, context)

    return call


def _unary(cls: Any, method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Parse the request bytes, call ``method``, map exceptions to status codes (the one place
    that does): never a traceback to the client. With a Guard, the caller is authenticated and
    rate-limited before the bytes are parsed, and its model and admin operation checked after."""
    name = cls.DESCRIPTOR.full_name
    servicer = method.__self__  # type: ignore[attr-defined]
    rule = RULES.get(method.__name__, ANY_CALLER)  # security/rules.py: kind, model field, admin operation
    kind, model_field, operation = rule.kind, rule.model_field, rule.operation
    rpc = f"inference.GRPCInferenceService/{method.__name__}"

    async def handler(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        if servicer.refusing:
            servicer.last_arrival = time.monotonic()
            await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        servicer.active += 1
        span = enter_grpc(context, rpc)  # the request id of its log lines; its span when tracing is on
        guard = servicer.guard
        try:
            if guard is None:
                return await method(cls.FromString(raw), context)
            caller = guard.admit(authorization(context), context.peer, kind)
            CALLER.set(caller)
            request = cls.FromString(raw)
            if caller is not None:
                if model_field:
                    model = getattr(request, model_field)
                    if model:
                        caller.check_model(model)
                if operation:
                    caller.check_admin(operation)
            return await method(request, context)
        except DecodeError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request is not a valid {name}: {exc}")
        except grpc.aio.AbortError:
            raise
        except ModelyardError as exc:
            await abort(context, servicer.public(exc))
        except Exception as exc:
            log.exception("%s failed", getattr(method, "__name__", name))
            await abort(context, servicer.public(as_modelyard_error(exc)))
        finally:
            servicer.active -= 1
            exit_grpc(span, sys.exc_info()[1])

    return handler


def _streaming(cls: Any, method: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    servicer = method.__self__  # type: ignore[attr-defined]
    rpc = f"inference.GRPCInferenceService/{method.__name__}"

    async def handler(raw_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        span = enter_grpc(context, rpc)
        if servicer.refusing:
            servicer.last_arrival = time.monotonic()
            await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        guard = servicer.guard
        if guard is not None:
            # the stream's caller: authenticated once; each message's model and bucket are checked in-band
            try:
                CALLER.set(guard.admit(authorization(context), context.peer, SERVER, limit=False))
            except ModelyardError as exc:
                await abort(context, exc)

        async def parsed() -> AsyncIterator[Any]:
            async for raw in raw_iterator:
                try:
                    yield cls.FromString(raw)
                except DecodeError as exc:
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, f"stream message is not a valid {cls.DESCRIPTOR.full_name}: {exc}"
                    )

        servicer.active += 1
        try:
            async for item in method(parsed(), context):
                yield item
        finally:
            servicer.active -= 1
            exit_grpc(span, sys.exc_info()[1])

    return handler


def add_inference_service(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """Register the servicer so that undecodable bytes are INVALID_ARGUMENT, not UNKNOWN.

    grpc's generated registration parses in the deserializer, where a failure can only
    surface as UNKNOWN; here handlers receive bytes and parse them themselves.
    """
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers = {}
    for m in service.methods:
        req_cls = getattr(pb, m.input_type.name)
        resp_cls = getattr(pb, m.output_type.name)
        method = getattr(servicer, m.name)
        if m.client_streaming and m.server_streaming:
            handlers[m.name] = grpc.stream_stream_rpc_method_handler(
                _streaming(req_cls, method), response_serializer=resp_cls.SerializeToString
            )
        else:
            handlers[m.name] = grpc.unary_unary_rpc_method_handler(
                _unary(req_cls, method), response_serializer=resp_cls.SerializeToString
            )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
