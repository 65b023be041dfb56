"""The ``python`` backend: a user class in ``<version>/model.py``.

The file defines ``class Model`` with optional ``load(self, ctx)`` and required
``execute(self, requests) -> list[InferResponse]``; decoupled models may define
``stream(self, request, cancelled)`` yielding responses. ``ctx`` is the runtime
(``ctx.config``, ``ctx.version_dir``, ``ctx.device``).
"""

from __future__ import annotations

import importlib.util
import itertools
import sys
from collections.abc import Callable, Iterator
from typing import Any

from modelyard.server.errors import ConfigError
from modelyard.server.execution.runtimes.base import Result, Runtime
from modelyard.server.types import InferRequest, InferResponse

_counter = itertools.count()


class PythonRuntime(Runtime):
    """Loads ``model.py`` (or ``default_model_filename``) and delegates to its ``Model`` class."""

    def load(self) -> None:
        filename = self.config.default_model_filename or "model.py"
        path = self.version_dir / filename
        if not path.is_file():
            raise ConfigError([f"{filename}: missing (the python backend loads class Model from it)"], str(self.version_dir))
        # A unique module name per load: two versions of one model must not share module state.
        mod_name = f"_modelyard_user_{self.config.name}_{self.version_dir.name}_{next(_counter)}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        self._mod_name = mod_name
        try:
            spec.loader.exec_module(module)
        except Exception:
            sys.modules.pop(mod_name, None)
            raise
        cls = getattr(module, "Model", None)
        if cls is None:
            raise ConfigError(["Model: the file defines no class Model"], str(path))
        self.user: Any = cls()
        if hasattr(self.user, "load"):
            self.user.load(self)
        self.supports_batching = bool(getattr(self.user, "supports_batching", True))

    def execute(self, requests: list[InferRequest]) -> list[Result]:
        results = list(self.user.execute(requests))
        if len(results) != len(requests):
            raise RuntimeError(f"model returned {len(results)} responses for {len(requests)} requests")
        return results

    def stream(self, request: InferRequest, cancelled: Callable[[], bool]) -> Iterator[InferResponse]:
        if hasattr(self.user, "stream"):
            yield from self.user.stream(request, cancelled)
        else:
            yield from super().stream(request, cancelled)

    def unload(self) -> None:
        user = getattr(self, "user", None)
        try:
            if user is not None and hasattr(user, "unload"):
                user.unload()
        finally:
            sys.modules.pop(getattr(self, "_mod_name", ""), None)  # module globals (weights loaded at import) go too
