"""The model repository: ``<root>/<model>/config.yaml`` and ``<root>/<model>/<version>/``.

Loading a model builds every selected version fresh, swaps them in at once and
only then unloads the versions they replace, which finish their in-flight
requests first: a reload never drops a request, and other models are untouched.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelyard.server.admission import Admission
from modelyard.server.errors import (
    ConfigError,
    InvalidInput,
    LoadFailed,
    ModelNotFound,
    ModelyardError,
    as_modelyard_error,
    failed_to_load,
    model_version,
    no_available_versions,
    unknown_model,
    unknown_version,
)
from modelyard.server.metrics import ServerMetrics
from modelyard.server.model import READY, UNAVAILABLE, ModelVersion
from modelyard.server.model_config import ModelConfig, TensorSpec, VersionPolicy, dependencies, load_config
from modelyard.server.scheduling.ensemble import check_composition

log = logging.getLogger("modelyard.server")

#: the ensembles whose loads are waiting on this one (an ensemble loads its missing steps' models first)
_loading: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("modelyard_loading", default=())


@dataclass(slots=True)
class Override:
    """What a load request puts in place of the repository's own files, for that load (Triton's load parameters)."""

    #: used instead of config.yaml (None: the repository's)
    config: ModelConfig | None = None
    #: a private directory (``file:`` parameters) used instead of ``<root>/<model>``; the repository owns it
    #: from then on and removes it when the model is unloaded or reloaded
    directory: Path | None = None


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
        #: model name -> the private directory (``file:`` override) its loaded versions come from
        self._private: dict[str, Path] = {}

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
        before = set(self.models)
        for name in names if names is not None else self.discover():
            if name in self.models and name not in before:
                continue  # loaded in this call already, as the step of an ensemble
            try:
                await self.load(name)
            except Exception as exc:
                failures[name] = str(exc)
        return failures

    async def load(self, name: str, override: Override | None = None) -> None:
        """Load or reload ``name``: new versions ready first, then the swap, then old ones drained.
        ``override``: a load request's config and / or private directory instead of the repository's."""
        path = self.model_dir(name)
        private = override.directory if override is not None else None
        if private is not None:
            path = private
        elif not path.is_dir():  # before the lock: made-up names must not grow _locks
            raise failed_to_load(name, f"no model directory '{name}' in the model repository", ModelNotFound)
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            loading = ""  # the version being loaded, for the error
            try:
                cfg = override.config if override is not None and override.config is not None else load_config(path)
                await self._load_steps(cfg)
                on_disk = [int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0]
                versions = select_versions(on_disk, cfg.version_policy)
                if not versions:
                    raise ConfigError(["no version directory matches version_policy (expected <model>/<N>/)"], name)
                fresh: dict[str, ModelVersion] = {}
                try:
                    for v in versions:
                        loading = str(v)
                        mv = ModelVersion(cfg, str(v), path / str(v), self.metrics, self.admission, resolve=self.get)
                        fresh[str(v)] = mv
                        await mv.load()
                except BaseException:
                    await asyncio.gather(*(mv.unload(0) for mv in fresh.values() if mv.state == READY))
                    raise
            except Exception as exc:
                if private is not None:
                    await asyncio.to_thread(shutil.rmtree, private, True)
                err = self._load_error(name, loading, exc, private)
                self.failed[name] = err.message
                log.error("model %s failed to load: %s", name, err.message)
                self._changed(name)
                raise err from None
            old = self.models.get(name, {})
            self.models[name] = fresh
            self.configs[name] = cfg
            self.failed.pop(name, None)
            stale = self._adopt(name, private)
            self._changed(name)
        if old:
            await asyncio.gather(*(mv.unload(self.unload_grace) for mv in old.values()))
        if stale is not None:
            await asyncio.to_thread(shutil.rmtree, stale, True)

    def _adopt(self, name: str, private: Path | None) -> Path | None:
        """Record the private directory ``name`` now loads from; returns the one it replaces (to remove)."""
        stale = self._private.pop(name, None)
        if private is not None:
            self._private[name] = private
        return stale if stale != private else None

    def _load_error(self, name: str, version: str, exc: Exception, private: Path | None) -> ModelyardError:
        """What a client is told about a failed load: Triton's wording, and no path of this server's disk."""
        if isinstance(exc, ConfigError):  # the config (or the version directories): Triton's "failed to poll"
            source = self.public_text(exc.source, private, name)
            return failed_to_load(name, self.public_text(ConfigError(exc.errors, source).message, private, name))
        if isinstance(exc, ModelyardError) and exc.message.startswith(("failed to load '", "load failed for model '")):
            return exc
        reason = self.public_text(as_modelyard_error(exc).message, private, name)
        if not version:
            return failed_to_load(name, reason)
        return LoadFailed(f"load failed for model '{name}': version {version} is at UNAVAILABLE state: {reason};")

    def public_text(self, text: str, private: Path | None = None, name: str = "") -> str:
        """``text`` with this server's directories written relative to the repository (clients never see
        an absolute server path)."""
        if private is not None:
            text = text.replace(str(private), name)
        for model, path in self._private.items():
            text = text.replace(str(path), model)
        root = str(self.root)
        return text.replace(root + os.sep, "").replace(root, "<model repository>")

    async def _load_steps(self, cfg: ModelConfig) -> None:
        """An ensemble's steps' models: load those not loaded yet (as Triton does), then check the ensemble
        against their configs."""
        steps = dependencies(cfg)
        if not steps:
            return
        chain = (*_loading.get(), cfg.name)
        token = _loading.set(chain)
        try:
            for step in steps:
                if step in chain:
                    raise ConfigError([f"ensemble_scheduling: ensembles form a cycle: {' -> '.join((*chain, step))}"],
                                      f"ensemble {cfg.name!r}")
                if step not in self.models:
                    try:
                        await self.load(step)
                    except Exception as exc:
                        raise ConfigError([f"ensemble_scheduling: step model {step!r} failed to load: "
                                           f"{as_modelyard_error(exc).message}"], f"ensemble {cfg.name!r}") from None
        finally:
            _loading.reset(token)
        check_composition(cfg, self.configs)
        es = cfg.ensemble_scheduling
        assert es is not None
        missing = [f"ensemble_scheduling.step[{i}].model_version: model {s.model_name!r} has no version {s.model_version} "
                   f"loaded (loaded: {sorted(self.models.get(s.model_name, {}), key=int)})"
                   for i, s in enumerate(es.step)
                   if s.model_version != -1 and str(s.model_version) not in self.models.get(s.model_name, {})]
        if missing:
            raise ConfigError(missing, f"ensemble {cfg.name!r}")

    async def unload(self, name: str, *, unload_dependents: bool = False) -> None:
        """Unload every version of ``name``; in-flight requests finish first. A model that is not loaded
        is no error (as in Triton). ``unload_dependents``: the models it was composed of (an ensemble's
        steps) too, those no other loaded model still uses."""
        self.model_dir(name)
        if name not in self.models and name not in self.failed:
            return  # nothing loaded (made-up names must not grow _locks)
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            old = self.models.pop(name, None)
            cfg = self.configs.pop(name, None)
            failed = self.failed.pop(name, None)
            private = self._private.pop(name, None)
            for mv in (old or {}).values():
                mv.state = "UNLOADING"
            if old is not None or failed is not None:
                self._changed(name)
        if old:
            await asyncio.gather(*(mv.unload(self.unload_grace) for mv in old.values()))
        if private is not None:
            await asyncio.to_thread(shutil.rmtree, private, True)
        if unload_dependents and cfg is not None:
            for step in dependencies(cfg):
                if not any(step in dependencies(other) for other in self.configs.values()):
                    await self.unload(step, unload_dependents=True)

    async def close(self) -> None:
        """Unload everything (server shutdown)."""
        models, self.models = self.models, {}
        await asyncio.gather(*(mv.unload(self.unload_grace) for vs in models.values() for mv in vs.values()))
        private, self._private = self._private, {}
        for path in private.values():
            await asyncio.to_thread(shutil.rmtree, path, True)

    # ------------------------------------------------------------------ lookup
    def versions(self, name: str) -> dict[str, ModelVersion]:
        versions = self.models.get(name)
        if versions is None:
            if name in self.failed:
                raise no_available_versions(name, self.failed[name])
            raise unknown_model(name)
        return versions

    def get(self, name: str, version: str = "") -> ModelVersion:
        """The version asked for, or the highest loaded one when ``version`` is empty (Triton's errors:
        an unparsable version is INVALID_ARGUMENT, checked before the model)."""
        number = model_version(version)
        versions = self.versions(name)
        if number is not None:
            mv = versions.get(str(number))
            if mv is None:
                raise unknown_version(name, number)
            return mv
        if not versions:
            raise no_available_versions(name)
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
        """Whether the version (default: the latest) is ready; an unparsable version string is an error
        (INVALID_ARGUMENT, as Triton answers ModelReady), an unknown model or version just not ready."""
        model_version(version)
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
