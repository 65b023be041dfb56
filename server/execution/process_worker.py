"""``execution: process``: an instance whose runtime lives in a worker process.

For runtimes that hold the GIL (pure-Python models, tokenisers) a thread per
instance does not scale; a process per instance does. The instance's worker
thread talks to its process over a pipe with small typed messages; numeric
tensors travel through one shared-memory segment per call and are viewed in
place on the other side (no pickling of the data). BYTES tensors, parameters and
errors are small and pickled with the message.

If the process dies mid-batch only that batch fails; the next call starts a
fresh process.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import numpy as np

from modelyard.server import errors
from modelyard.server.errors import ConfigError, ModelExecutionError, ModelyardError, as_modelyard_error
from modelyard.server.execution.runtimes.base import Result, Runtime, runtime_class
from modelyard.server.model_config import ModelConfig
from modelyard.server.types import InferRequest, InferResponse

log = logging.getLogger("modelyard.server")
_ALIGN = 64


@dataclass(slots=True)
class _Slot:
    """Where one array lives: in the segment (offset) or inline (object arrays)."""

    dtype: str
    shape: tuple[int, ...]
    offset: int = -1
    inline: Any = None


def pack(groups: list[dict[str, np.ndarray]], *, child: bool = False) -> tuple[SharedMemory | None, list[dict[str, _Slot]]]:
    """Copy the numeric arrays of ``groups`` into one new shared-memory segment; returns it (open) and the slots."""
    slots: list[dict[str, _Slot]] = []
    total = 0
    for arrays in groups:
        entry = {}
        for name, arr in arrays.items():
            arr = np.asarray(arr)
            if arr.dtype == object:
                entry[name] = _Slot("object", arr.shape, inline=arr)
                continue
            entry[name] = _Slot(arr.dtype.str, arr.shape, offset=total)
            total += (arr.nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
        slots.append(entry)
    if total == 0:
        return None, slots
    shm = SharedMemory(create=True, size=total)
    if child:
        # The parent unlinks it after reading; the child's tracker must not unlink it again at exit.
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    for arrays, entry in zip(groups, slots, strict=True):
        for name, slot in entry.items():
            if slot.offset >= 0:
                arr = np.asarray(arrays[name])
                np.ndarray(arr.shape, arr.dtype, buffer=shm.buf, offset=slot.offset)[...] = arr
    return shm, slots


def unpack(shm: SharedMemory | None, slots: list[dict[str, _Slot]], *, copy: bool) -> list[dict[str, np.ndarray]]:
    """Arrays from a segment: views (``copy=False``, valid while ``shm`` is open) or copies."""
    out = []
    for entry in slots:
        arrays = {}
        for name, slot in entry.items():
            if slot.offset < 0:
                arrays[name] = slot.inline
                continue
            assert shm is not None
            view = np.ndarray(slot.shape, np.dtype(slot.dtype), buffer=shm.buf, offset=slot.offset)
            arrays[name] = view.copy() if copy else view
        out.append(arrays)
    return out


def _strip(request: InferRequest) -> InferRequest:
    return InferRequest(model=request.model, inputs={}, version=request.version, id=request.id,
                        parameters=request.parameters, outputs=request.outputs,
                        output_parameters=request.output_parameters, priority=request.priority,
                        sequence=request.sequence)


def _pack_results(results: list[Any]) -> tuple[str | None, list[Any], list[dict[str, _Slot]]]:
    """Responses -> (segment, shells without outputs, slots); exceptions travel pickled as they are."""
    groups = [r.outputs if isinstance(r, InferResponse) else {} for r in results]
    shm, slots = pack(groups, child=True)
    name = None
    if shm is not None:
        name = shm.name
        shm.close()
    shells = [InferResponse(outputs={}, parameters=r.parameters, final=r.final) if isinstance(r, InferResponse)
              else _encode_error(r) for r in results]
    return name, shells, slots


def _encode_error(exc: BaseException) -> tuple[str, str, list[str]]:
    """Errors cross the pipe as (class name, message, problems): not every exception pickles."""
    if isinstance(exc, ConfigError):
        return ("ConfigError", exc.message, exc.errors)
    err = as_modelyard_error(exc)
    return (type(err).__name__, err.message, [])


def _decode_error(encoded: tuple[str, str, list[str]], source: str) -> ModelyardError | ConfigError:
    cls_name, message, problems = encoded
    if cls_name == "ConfigError":
        return ConfigError(problems or [message], source)
    cls = getattr(errors, cls_name, None)
    if isinstance(cls, type) and issubclass(cls, ModelyardError):
        return cls(message)
    return ModelExecutionError(message)


def _worker_main(conn: Connection, config: ModelConfig, version_dir: str, device: str) -> None:
    """The worker process: load the runtime, then serve execute/stream messages until stop."""
    try:
        runtime = runtime_class(config.backend)(config, Path(version_dir), device)
        runtime.load()
    except BaseException as exc:
        conn.send(("error", _encode_error(exc)))
        return
    conn.send(("ready", getattr(runtime, "supports_batching", True)))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        kind = msg[0]
        if kind == "cancel":  # arrived after its stream had already ended
            continue
        if kind == "stop":
            with contextlib.suppress(Exception):
                runtime.unload()
            return
        _, shm_name, slots, shells = msg
        shm = SharedMemory(name=shm_name) if shm_name else None
        try:
            requests = []
            for shell, arrays in zip(shells, unpack(shm, slots, copy=False), strict=True):
                shell.inputs = arrays
                requests.append(shell)
            if kind == "execute":
                try:
                    results: list[Any] = runtime.execute(requests)
                except BaseException as exc:
                    results = [exc] * len(requests)
                conn.send(("result", *_pack_results(results)))
            elif kind == "stream":
                cancelled = threading.Event()

                def is_cancelled(flag: threading.Event = cancelled) -> bool:
                    while not flag.is_set() and conn.poll():
                        if conn.recv()[0] == "cancel":
                            flag.set()
                    return flag.is_set()

                try:
                    for resp in runtime.stream(requests[0], is_cancelled):
                        conn.send(("item", *_pack_results([resp])))
                        if is_cancelled():
                            break
                    conn.send(("end",))
                except BaseException as exc:
                    conn.send(("raise", _encode_error(exc)))
        finally:
            if shm is not None:
                shm.close()


class ProcessRuntime(Runtime):
    """Proxy runtime: the real one (``config.backend``) runs in a spawned worker process."""

    def __init__(self, config: ModelConfig, version_dir: Path, device: str = "cpu") -> None:
        super().__init__(config, version_dir, device)
        self._conn: Connection | None = None
        self._proc: Any = None

    def load(self) -> None:
        runtime_class(self.config.backend)  # fail fast (unknown backend, missing extra) in this process
        ctx = mp.get_context("spawn")  # fork would copy the server's threads and event loop
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker_main, args=(child, self.config, str(self.version_dir), self.device),
                           name=f"modelyard-{self.config.name}", daemon=True)
        proc.start()
        child.close()
        try:
            status = parent.recv()
        except EOFError:
            proc.join(5)
            raise ModelExecutionError(f"worker process for {self.config.name!r} exited during load "
                                      f"(exit code {proc.exitcode})") from None
        if status[0] == "error":
            proc.join(5)
            raise _decode_error(status[1], f"model {self.config.name!r}")
        self.supports_batching = bool(status[1])
        self._conn, self._proc = parent, proc

    def _ensure(self) -> Connection:
        if self._conn is None or self._proc is None or not self._proc.is_alive():
            log.warning("worker process for %s is gone; starting a new one", self.config.name)
            self.load()
        assert self._conn is not None
        return self._conn

    def _send(self, kind: str, requests: list[InferRequest]) -> tuple[Connection, SharedMemory | None]:
        conn = self._ensure()
        shm, slots = pack([r.inputs for r in requests])
        try:
            conn.send((kind, shm.name if shm else None, slots, [_strip(r) for r in requests]))
        except BaseException:
            _release(shm)
            raise
        return conn, shm

    def _receive(self, conn: Connection) -> tuple[Any, ...]:
        try:
            return conn.recv()
        except (EOFError, OSError):
            self._conn = None
            raise ModelExecutionError(f"worker process for {self.config.name!r} died during the batch") from None

    def _results(self, msg: tuple[Any, ...]) -> list[Result]:
        _, name, shells, slots = msg
        shm = SharedMemory(name=name) if name else None
        try:
            arrays = unpack(shm, slots, copy=True)
        finally:
            _release(shm)
        out: list[Result] = []
        for shell, outs in zip(shells, arrays, strict=True):
            if isinstance(shell, InferResponse):
                shell.outputs = outs
                out.append(shell)
            else:
                out.append(as_modelyard_error(_decode_error(shell, f"model {self.config.name!r}")))
        return out

    def execute(self, requests: list[InferRequest]) -> list[Result]:
        conn, shm = self._send("execute", requests)
        try:
            return self._results(self._receive(conn))
        finally:
            _release(shm)

    def stream(self, request: InferRequest, cancelled: Callable[[], bool]) -> Iterator[InferResponse]:
        conn, shm = self._send("stream", [request])
        done = False
        try:
            while True:
                if cancelled():
                    break
                msg = self._receive(conn)
                if msg[0] == "end":
                    done = True
                    return
                if msg[0] == "raise":
                    done = True
                    raise _decode_error(msg[1], f"model {self.config.name!r}")
                (resp,) = self._results(msg)
                if isinstance(resp, BaseException):
                    raise resp
                yield resp
        finally:
            if not done and self._conn is not None:
                # stopped early (cancel or consumer gone): tell the worker and drain to its end marker,
                # so the next call on this pipe does not read stale tokens
                with contextlib.suppress(Exception):
                    conn.send(("cancel",))
                    while True:
                        msg = conn.recv()
                        if msg[0] in ("end", "raise"):
                            break
                        if msg[0] == "item" and msg[1]:
                            _release(SharedMemory(name=msg[1]))
            _release(shm)

    def unload(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.send(("stop",))
        if self._proc is not None:
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join(5)
        self._conn = self._proc = None


def _release(shm: SharedMemory | None) -> None:
    """Close and unlink a segment this side is done with."""
    if shm is None:
        return
    with contextlib.suppress(FileNotFoundError):
        shm.close()
        shm.unlink()
