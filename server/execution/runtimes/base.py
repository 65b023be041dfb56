"""The runtime (backend) interface and its registry.

A runtime is one loaded copy of a model on one device: an *instance*. The server
creates ``count`` of them per instance group and calls them from worker threads
(or a worker process), never from the event loop.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeAlias

from modelyard.server.errors import ConfigError
from modelyard.server.model_config import ModelConfig
from modelyard.server.types import InferRequest, InferResponse

#: what execute() returns per request: a response, or the exception that request failed with
Result: TypeAlias = InferResponse | BaseException


class Runtime:
    """Base class for backends. Subclasses override :meth:`load` and :meth:`execute`.

    ``execute`` receives a batch of requests (one, unless the model batches) and
    returns one result per request, in order; an exception in the list fails only
    that request, an exception raised fails the whole batch.
    """

    #: can requests of this runtime be stacked along dim 0 by the scheduler?
    supports_batching: bool = True

    def __init__(self, config: ModelConfig, version_dir: Path, device: str = "cpu") -> None:
        self.config = config
        self.version_dir = version_dir
        self.device = device

    def load(self) -> None:
        """Load weights/files from ``version_dir``; may be slow (runs in a worker thread)."""

    def execute(self, requests: list[InferRequest]) -> list[Result]:
        raise NotImplementedError

    def stream(self, request: InferRequest, cancelled: Callable[[], bool]) -> Iterator[InferResponse]:
        """Decoupled models: yield responses one by one; stop early when ``cancelled()`` is true.

        The default yields the single response of :meth:`execute`.
        """
        (result,) = self.execute([request])
        if isinstance(result, BaseException):
            raise result
        yield result

    def unload(self) -> None:
        """Release resources (GPU memory, files)."""


#: backend name -> "module:Class" (imported lazily so torch is only imported when used)
BACKENDS: dict[str, str] = {
    "python": "modelyard.server.execution.runtimes.python:PythonRuntime",
    "transformers": "modelyard.server.execution.runtimes.transformers:TransformersRuntime",
    "torchscript": "modelyard.server.execution.runtimes.torchscript:TorchScriptRuntime",
}


def register_backend(name: str, target: str) -> None:
    """Register a runtime class under ``backend: name`` ("module:Class")."""
    BACKENDS[name] = target


def runtime_class(backend: str, source: str = "config.yaml") -> type[Runtime]:
    target = BACKENDS.get(backend)
    if target is None:
        raise ConfigError([f"backend: unknown backend {backend!r}; one of {', '.join(sorted(BACKENDS))}"], source)
    module, _, cls = target.partition(":")
    try:
        mod: Any = importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            [f"backend: {backend!r} needs an optional dependency that is not installed ({exc.name}); "
                     "install modelyard[torch]"], source) from None
    return getattr(mod, cls)
