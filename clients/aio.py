"""The asyncio client (grpc.aio): the same methods as the blocking one, awaited."""

# `timeout` is a gRPC deadline sent to the server, which asyncio.timeout() cannot express.
# ruff: noqa: ASYNC109

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from types import TracebackType
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from modelyard.clients.channel import ChannelSettings, ClientBase
from modelyard.clients.errors import InferenceServerError
from modelyard.clients.requests import ParamValue, build_infer_request
from modelyard.clients.results import InferResult, decode_result, decode_stream_response
from modelyard.protos import grpc_service_pb2 as pb
from modelyard.protos import model_config_pb2


class AsyncInferenceClient(ClientBase):
    """asyncio client for ``inference.GRPCInferenceService`` (KServe v2 / Triton) and grpc.health.v1.

    Create it inside a running event loop. Every failed call raises :class:`InferenceServerError` with the gRPC status code.
    ``timeout`` arguments are seconds (None: no deadline).
    """

    def _open(self, settings: ChannelSettings) -> Any:
        return settings.open_aio()

    # ------------------------------------------------------------------ lifecycle
    async def close(self) -> None:
        """Close the channel; in-flight calls are cancelled."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncInferenceClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise InferenceServerError.from_rpc_error(exc) from None

    # ------------------------------------------------------------------ health
    async def is_server_live(self, *, timeout: float | None = None) -> bool:
        """ServerLive."""
        return bool((await self._call(self._stub.ServerLive, pb.ServerLiveRequest(), timeout)).live)

    async def is_server_ready(self, *, timeout: float | None = None) -> bool:
        """ServerReady."""
        return bool((await self._call(self._stub.ServerReady, pb.ServerReadyRequest(), timeout)).ready)

    async def is_model_ready(self, model: str, version: str = "", *, timeout: float | None = None) -> bool:
        """ModelReady (False for an unknown model, as the protocol says)."""
        request = pb.ModelReadyRequest(name=model, version=version)
        return bool((await self._call(self._stub.ModelReady, request, timeout)).ready)

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """grpc.health.v1 Check: ``"SERVING"``, ``"NOT_SERVING"``... (service "" is the whole server)."""
        response = await self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    # ------------------------------------------------------------------ metadata
    async def server_metadata(self, *, timeout: float | None = None) -> pb.ServerMetadataResponse:
        """Server name, version and protocol extensions."""
        return await self._call(self._stub.ServerMetadata, pb.ServerMetadataRequest(), timeout)

    async def model_metadata(self, model: str, version: str = "", *, timeout: float | None = None) -> pb.ModelMetadataResponse:
        """Inputs and outputs with datatypes and shapes (-1 marks a variable dimension)."""
        request = pb.ModelMetadataRequest(name=model, version=version)
        return await self._call(self._stub.ModelMetadata, request, timeout)

    async def model_config(self, model: str, version: str = "", *, timeout: float | None = None) -> model_config_pb2.ModelConfig:
        """The model's configuration (Triton ``ModelConfig``)."""
        request = pb.ModelConfigRequest(name=model, version=version)
        return (await self._call(self._stub.ModelConfig, request, timeout)).config

    async def statistics(self, model: str = "", version: str = "", *, timeout: float | None = None) -> pb.ModelStatisticsResponse:
        """Per-version inference statistics; model "" means every model."""
        request = pb.ModelStatisticsRequest(name=model, version=version)
        return await self._call(self._stub.ModelStatistics, request, timeout)

    # ------------------------------------------------------------------ repository
    async def repository_index(
        self, *, ready: bool = False, timeout: float | None = None
    ) -> list[pb.RepositoryIndexResponse.ModelIndex]:
        """Every model in the repository with its versions' states (``ready=True``: ready ones only)."""
        response = await self._call(self._stub.RepositoryIndex, pb.RepositoryIndexRequest(ready=ready), timeout)
        return list(response.models)

    async def load_model(self, name: str, *, timeout: float | None = None) -> None:
        """Load, or reload, a model from the repository."""
        await self._call(self._stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name=name), timeout)

    async def unload_model(self, name: str, *, timeout: float | None = None) -> None:
        """Unload every version of a model (its in-flight requests finish first)."""
        await self._call(self._stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name=name), timeout)

    # ------------------------------------------------------------------ inference
    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        outputs: Iterable[str] | None = None,
        version: str = "",
        parameters: Mapping[str, ParamValue] | None = None,
        request_id: str = "",
        timeout: float | None = None,
    ) -> InferResult:
        """ModelInfer: inputs go as raw contents; ``outputs`` picks which outputs come back (default all)."""
        request = build_infer_request(
            model, inputs, outputs=outputs, version=version, parameters=parameters, request_id=request_id
        )
        return decode_result(await self._call(self._stub.ModelInfer, request, timeout))

    async def stream_infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        outputs: Iterable[str] | None = None,
        version: str = "",
        parameters: Mapping[str, ParamValue] | None = None,
        request_id: str = "",
        timeout: float | None = None,
    ) -> AsyncIterator[InferResult]:
        """One request over ModelStreamInfer; yields each response as it arrives (decoupled models
        send several). An in-band error raises InferenceServerError; closing the iterator early
        cancels the call."""
        request = build_infer_request(
            model, inputs, outputs=outputs, version=version, parameters=parameters, request_id=request_id
        )
        call = self._stub.ModelStreamInfer(iter([request]), timeout=timeout, metadata=self._metadata)
        try:
            async for message in call:
                result = decode_stream_response(message)
                if result is not None:
                    yield result
        except grpc.RpcError as exc:
            raise InferenceServerError.from_rpc_error(exc) from None
        finally:
            call.cancel()
