"""Model control: which models load at start, whether clients may load and unload, repository polling.

Triton's three modes (``--model-control-mode``), with Triton's answers:

* ``none``: every model loads at start; load / unload requests are refused (UNAVAILABLE,
  "explicit model load / unload is not allowed if polling is enabled").
* ``poll``: as ``none``, and the repository is rescanned every ``--repository-poll-secs``: new models
  (or changed configs / version directories / files) are (re)loaded, removed ones unloaded.
* ``explicit``: only the ``--load-model`` models load at start (``*``: all of them); clients load and unload.

Unset (modelyard's default, kept for existing deployments): every model (or the ``--load-model`` ones)
loads at start and clients may load and unload -- ``explicit`` with ``*`` as the default.

A load request's parameters are Triton's: ``config`` (a JSON model config, protobuf field names, used
instead of config.yaml) and ``file:<path>`` (bytes: the files of a private model directory used for
this load; needs ``config``). The frontends only decode their wire format into :data:`LoadParam` values.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from modelyard.config import ConfigError
from modelyard.protos import model_config_pb2 as mc
from modelyard.server.errors import (
    CONTROL_DISABLED,
    InvalidInput,
    ModelControlDisabled,
    failed_to_load,
)
from modelyard.server.model_config import ModelConfig, parse_config
from modelyard.server.repository import ModelRepository, Override

log = logging.getLogger("modelyard.server")

MODES = ("none", "poll", "explicit")
#: every model, as the one ``--load-model`` value (Triton's wildcard)
ALL = "*"
FILE_PREFIX = "file:"
#: the longest file name a path component may have (Linux NAME_MAX)
NAME_MAX = 255

#: a load parameter's value as the frontends decode it (gRPC's oneof, HTTP's JSON with file: base64-decoded)
LoadParam = str | bytes | bool | int


def startup_models(mode: str | None, load_models: list[str] | None) -> list[str] | None:
    """The models to load at start (None: every model in the repository)."""
    if mode in ("none", "poll"):
        return None
    if load_models is None:
        return None if mode is None else []
    return None if load_models == [ALL] else list(load_models)


class ModelControl:
    """Loads at start, serves load / unload requests and polls the repository, as the mode says."""

    def __init__(self, repository: ModelRepository, mode: str | None = None, *, poll_secs: float = 15.0,
                 load_models: list[str] | None = None) -> None:
        self.repo = repository
        self.mode = mode
        self.poll_secs = poll_secs
        self.load_models = load_models
        #: model name -> fingerprint of its directory at the last scan (poll mode)
        self._seen: dict[str, tuple[Any, ...]] = {}
        self._poller: asyncio.Task[None] | None = None

    @property
    def allows_requests(self) -> bool:
        """Whether clients may load and unload (modes explicit and unset)."""
        return self.mode not in ("none", "poll")

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> dict[str, str]:
        """Load the start-up models; in poll mode start polling. Returns failures by model name."""
        if self.mode == "poll":
            self._seen = await asyncio.to_thread(self.scan)
        failures = await self.repo.load_all(startup_models(self.mode, self.load_models))
        if self.mode == "poll" and self.poll_secs > 0:
            self._poller = asyncio.create_task(self._poll_forever(), name="modelyard-repository-poll")
        return failures

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None

    # ------------------------------------------------------------------ requests
    async def load(self, name: str, parameters: Mapping[str, LoadParam] | None = None) -> None:
        """RepositoryModelLoad / POST .../load: load or reload ``name``, with Triton's load parameters."""
        self._check_allowed()
        self.repo.model_dir(name)  # the name check first: a bad name never reaches the disk
        override = await self._override(name, parameters or {})
        await self.repo.load(name, override)

    async def unload(self, name: str, unload_dependents: bool = False) -> None:
        """RepositoryModelUnload / POST .../unload (``unload_dependents``: an ensemble's steps too)."""
        self._check_allowed()
        await self.repo.unload(name, unload_dependents=unload_dependents)

    def _check_allowed(self) -> None:
        if not self.allows_requests:
            raise ModelControlDisabled(CONTROL_DISABLED)

    async def _override(self, name: str, parameters: Mapping[str, LoadParam]) -> Override | None:
        config_text: str | None = None
        files: dict[str, bytes] = {}
        for key, value in parameters.items():
            if key == "config" and isinstance(value, str):
                config_text = value
            elif key.startswith(FILE_PREFIX):
                if not isinstance(value, bytes):
                    raise InvalidInput(f"load parameter '{key}' must be bytes (the file's content), got "
                                       f"'{param_type(value)}'")
                files[check_file_path(key)] = value
            else:
                raise InvalidInput(f"Unrecognized load parameter '{key}' with type '{param_type(value)}'")
        if files and config_text is None:
            raise failed_to_load(name, "a 'file:' override needs the 'config' parameter too (the model "
                                       "configuration of the override directory)")
        if config_text is None:
            return None
        config = parse_override(name, config_text)
        directory = await asyncio.to_thread(materialise, name, files) if files else None
        return Override(config=config, directory=directory)

    # ------------------------------------------------------------------ poll mode
    def scan(self) -> dict[str, tuple[Any, ...]]:
        """Every model on disk with a fingerprint of its directory (blocking: run in a thread)."""
        return {name: fingerprint(self.repo.root / name) for name in self.repo.discover()}

    async def poll(self) -> None:
        """One rescan: unload removed models, (re)load new and changed ones; failures are logged."""
        seen = await asyncio.to_thread(self.scan)
        for name in sorted(set(self._seen) - set(seen)):
            log.info("repository poll: model %s was removed; unloading it", name)
            await self.repo.unload(name)
        for name in sorted(seen):
            if self._seen.get(name) == seen[name]:
                continue
            log.info("repository poll: model %s is new or changed; loading it", name)
            try:
                await self.repo.load(name)
            except Exception as exc:  # the old versions (if any) keep serving
                log.error("repository poll: model %s failed to load: %s", name, exc)
        self._seen = seen

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_secs)
            try:
                await self.poll()
            except Exception:
                log.exception("repository poll failed")


def fingerprint(model_dir: Path) -> tuple[Any, ...]:
    """(relative path, mtime, size) of everything under ``model_dir``: changes when a config, a version
    directory or a model file does."""
    entries: list[tuple[str, int, int]] = []
    for dirpath, dirnames, filenames in os.walk(model_dir):
        dirnames.sort()
        for fname in sorted(dirnames + filenames):
            path = os.path.join(dirpath, fname)
            try:
                st = os.stat(path)
            except OSError:
                continue
            entries.append((os.path.relpath(path, model_dir), st.st_mtime_ns, st.st_size))
    return tuple(entries)


def param_type(value: Any) -> str:
    """Triton's name of a parameter's type (TRITONSERVER_ParameterTypeString)."""
    if isinstance(value, bool):
        return "BOOL"
    if isinstance(value, int):
        return "INT"
    if isinstance(value, str):
        return "STRING"
    if isinstance(value, bytes):
        return "BYTES"
    return "INVALID"


def check_file_path(key: str) -> str:
    """The relative path of a ``file:<path>`` parameter, refused when it could leave the private directory."""
    rel = key[len(FILE_PREFIX):]
    parts = rel.split("/")
    if (not rel or rel.startswith("/") or "\\" in rel or "\x00" in rel
            or any(p in ("", ".", "..") for p in parts) or any(len(p.encode()) > NAME_MAX for p in parts)):
        raise InvalidInput(f"Invalid file path in load parameter '{key[:300]}': expected 'file:<version>/<file>', "
                           f"a relative path without '.' or '..' components, each at most {NAME_MAX} bytes")
    return str(PurePosixPath(rel))


def materialise(name: str, files: Mapping[str, bytes]) -> Path:
    """A private directory holding ``files`` (blocking: run in a thread); the repository removes it on
    unload or reload."""
    root = Path(tempfile.mkdtemp(prefix=f"modelyard-{name}-"))
    try:
        for rel, content in files.items():
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return root


# ---------------------------------------------------------------------- the config parameter


def parse_override(name: str, text: str) -> ModelConfig:
    """Triton's JSON model config (protobuf field names; int64 values as numbers or strings) -> ModelConfig."""
    msg = mc.ModelConfig()
    try:
        json_format.Parse(text, msg)
    except (json_format.ParseError, ValueError, TypeError) as exc:
        raise failed_to_load(name, f"Invalid config override: {exc}") from None
    data = plain(msg)
    for group in data.get("instance_group", []):
        group.pop("name", None)  # Triton names groups; modelyard numbers them (what ModelConfig reports)
    try:
        return parse_config(data, name, source="config override")
    except ConfigError as exc:
        raise failed_to_load(name, f"Invalid config override: {exc.message}") from None


def plain(msg: Message) -> dict[str, Any]:
    """The fields of ``msg`` that are set, as config.yaml would write them: enums by name, int64 as int."""
    return {fd.name: _value(fd, value) for fd, value in msg.ListFields()}


def _value(fd: FieldDescriptor, value: Any) -> Any:
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        vfd = fd.message_type.fields_by_name["value"]
        return {k: _scalar(vfd, v) for k, v in value.items()}
    if _repeated(fd):
        return [_scalar(fd, v) for v in value]
    return _scalar(fd, value)


def _repeated(fd: FieldDescriptor) -> bool:
    flag = getattr(fd, "is_repeated", None)  # protobuf >= 6.32; older ones have only label
    return bool(flag) if flag is not None else fd.label == FieldDescriptor.LABEL_REPEATED


def _scalar(fd: FieldDescriptor, value: Any) -> Any:
    if fd.type == FieldDescriptor.TYPE_MESSAGE:
        return plain(value)
    if fd.type == FieldDescriptor.TYPE_ENUM:
        known = fd.enum_type.values_by_number.get(value)
        return known.name if known is not None else value
    return value
