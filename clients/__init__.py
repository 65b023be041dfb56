"""modelyard clients: sync and asyncio gRPC clients for the KServe v2 / Triton protocol, and the CLI."""

from modelyard.clients.aio import AsyncInferenceClient
from modelyard.clients.client import InferenceClient
from modelyard.clients.errors import InferenceServerError
from modelyard.clients.results import InferResult

__all__ = ["AsyncInferenceClient", "InferResult", "InferenceClient", "InferenceServerError"]
