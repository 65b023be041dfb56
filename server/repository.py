"""The model repository: ``<root>/<model>/config.yaml`` and ``<root>/<model>/<version>/``.

Loading a model builds every selected version fresh, swaps them in at once and
only then unloads the versions they replace, which finish their in-flight
requests first: a reload never drops a request, and other models are untouched.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelyard.server.admission import Admission
from modelyard.server.errors import (
    ConfigError,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    as_modelyard_error,
)
from modelyard.server.metrics import ServerMetrics
from modelyard.server.model import READY, UNAVAILABLE, ModelVersion
from modelyard.server.model_config import ModelConfig, TensorSpec, VersionPolicy, load_config

log = logging.getLogger("modelyard.server")


@dataclass(slots=True)
class IndexEntry:
    name: str
    version: str
    state: str
    reason: str


def select_versions(available: list[int], policy: VersionPolicy) -> list[int]:
    """Versions a policy serves out of those present on disk (sorted ascending)."""
    ordered = sorted(available)
    if policy.kind == "all":
        return ordered
    if policy.kind == "specific":
        return [v for v in ordered if v in set(policy.versions)]
    return ordered[-policy.num_versions :] if ordered else []


class ModelRepository:
    """Models on disk and the versions loaded from them."""

    def __init__(
        self,
        root: Path,
        metrics: ServerMetrics | None = None,
        *,
        unload_grace: float = 30.0,
        admission: Admission | None = None,
    ) -> None:
        self.root = root.resolve()
        self.metrics = metrics or ServerMetrics()
        self.unload_grace = unload_grace
        #: the server-wide load-shedding bounds every version shares (None: none)
        self.admission = admission
        #: name -> {version -> ModelVersion}; replaced wholesale on (re)load, never mutated in place
        self.models: dict[str, dict[str, ModelVersion]] = {}
        self.failed: dict[str, str] = {}
        self.configs: dict[str, ModelConfig] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._listeners: list[Callable[[str], None]] = []

    # ------------------------------------------------------------------ disk
    def model_dir(self, name: str) -> Path:
        """The directory of ``name``; refuses names that would escape the repository."""
        if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
            raise InvalidInput(f"invalid model name {name!r}: a model is a directory directly under the repository")
        path = (self.root / name).resolve()
        if path.parent != self.root:
            raise InvalidInput(f"invalid model name {name!r}: resolves outside the repository")
        return path

    def discover(self) -> list[str]:
        """Model names present on disk (directories holding a config.yaml)."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir()
            if p.is_dir() and not p.name.startswith((".", "_")) and ((p / "config.yaml").is_file() or (p / "config.yml").is_file())
        )

    # ------------------------------------------------------------------ listeners
    def on_change(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(model_name)`` whenever a model's readiness may have changed."""
        self._listeners.append(callback)

    def _changed(self, name: str) -> None:
        for cb in self._listeners:
            try:
                cb(name)
            except Exception:  # a listener must not break loading
                log.exception("repository listener failed for %s", name)

    # ------------------------------------------------------------------ load / unload
    async def load_all(self, names: list[str] | None = None) -> dict[str, str]:
        """Load ``names`` (default: every model on disk); returns failures by name."""
        failures: dict[str, str] = {}
        for name in names if names is not None else self.discover():
            try:
                await self.load(name)
            except Exception as exc:
                failures[name] = str(exc)
        return failures

    async def load(self, name: str) -> None:
        """Load or reload ``name``: new versions ready first, then the swap, then old ones drained."""
        path = self.model_dir(name)
        if not path.is_dir():  # before the lock: made-up names must not grow _locks
            raise ModelNotFound(f"model '{name}' not found in repository {self.root}")
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            try:
                cfg = load_config(path)
                on_disk = [int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0]
                versions = select_versions(on_disk, cfg.version_policy)
                if not versions:
                    raise ConfigError(["no version directory matches version_policy (expected <model>/<N>/)"], str(path))
                fresh: dict[str, ModelVersion] = {}
                try:
                    for v in versions:
                        mv = ModelVersion(cfg, str(v), path / str(v), self.metrics, self.admission)
                        fresh[str(v)] = mv
                        await mv.load()
                except BaseException:
                    await asyncio.gather(*(mv.unload(0) for mv in fresh.values() if mv.state == READY))
                    raise
            except Exception as exc:
                err = as_modelyard_error(exc)
                self.failed[name] = err.message
                log.error("model %s failed to load: %s", name, err.message)
                self._changed(name)
                raise err from None
            old = self.models.get(name, {})
            self.models[name] = fresh
            self.configs[name] = cfg
            self.failed.pop(name, None)
            self._changed(name)
        if old:
            await asyncio.gather(*(mv.unload(self.unload_grace) for mv in old.values()))

    async def unload(self, name: str) -> None:
        """Unload every version of ``name``; in-flight requests finish first."""
        self.model_dir(name)
        if name not in self.models:
            raise ModelNotFound(f"model '{name}' is not loaded")
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            old = self.models.pop(name, None)
            self.configs.pop(name, None)
            self.failed.pop(name, None)
            if old is None:
                raise ModelNotFound(f"model '{name}' is not loaded")
            for mv in old.values():
                mv.state = "UNLOADING"
            self._changed(name)
        await asyncio.gather(*(mv.unload(self.unload_grace) for mv in old.values()))

    async def close(self) -> None:
        """Unload everything (server shutdown)."""
        models, self.models = self.models, {}
        await asyncio.gather(*(mv.unload(self.unload_grace) for vs in models.values() for mv in vs.values()))

    # ------------------------------------------------------------------ lookup
    def versions(self, name: str) -> dict[str, ModelVersion]:
        versions = self.models.get(name)
        if versions is None:
            if name in self.failed:
                raise ModelNotReady(f"model '{name}' failed to load: {self.failed[name]}")
            raise ModelNotFound(f"unknown model '{name}'")
        return versions

    def get(self, name: str, version: str = "") -> ModelVersion:
        """The version asked for, or the highest loaded one when ``version`` is empty."""
        versions = self.versions(name)
        if version:
            mv = versions.get(version)
            if mv is None:
                raise ModelNotFound(f"unknown version '{version}' of model '{name}'; loaded: {sorted(versions, key=int)}")
            return mv
        if not versions:
            raise ModelNotReady(f"model '{name}' has no loaded version")
        return versions[max(versions, key=int)]

    def metadata(self, name: str, version: str = "") -> dict[str, Any]:
        """KServe v2 model metadata (the same document for gRPC ModelMetadata and REST)."""
        cfg = self.get(name, version).config
        batch = [-1] if cfg.max_batch_size > 0 else []

        def tensor(spec: TensorSpec) -> dict[str, Any]:
            # the declared datatype only (accept_datatypes has no place in the protocol's metadata);
            # a tensor of any shape (dims omitted) reports one variable dimension
            return {"name": spec.name, "datatype": spec.datatype, "shape": batch + (spec.dims if spec.dims is not None else [-1])}

        return {
            "name": cfg.name,
            "versions": sorted(self.versions(cfg.name), key=int),
            "platform": cfg.platform or cfg.backend,
            "inputs": [tensor(s) for s in cfg.inputs],
            "outputs": [tensor(s) for s in cfg.outputs],
        }

    def is_ready(self, name: str, version: str = "") -> bool:
        try:
            return self.get(name, version).state == READY
        except Exception:
            return False

    def all_ready(self) -> bool:
        return all(mv.state == READY for vs in self.models.values() for mv in vs.values())

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every model on disk or loaded, with each loaded version's state (RepositoryIndex)."""
        entries: list[IndexEntry] = []
        for name in sorted(set(self.discover()) | set(self.models) | set(self.failed)):
            versions = self.models.get(name)
            if versions:
                for v in sorted(versions, key=int):
                    mv = versions[v]
                    entries.append(IndexEntry(name, v, mv.state, mv.reason))
            elif name in self.failed:
                entries.append(IndexEntry(name, "", UNAVAILABLE, self.failed[name]))
            else:
                entries.append(IndexEntry(name, "", UNAVAILABLE, "not loaded"))
        if ready_only:
            entries = [e for e in entries if e.state == READY]
        return entries
