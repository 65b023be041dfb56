"""Triton's shared memory extensions: regions of memory the client registers by name, then names in a
request instead of sending a tensor's bytes.

Two kinds of region, one registry (names are unique across both, as in Triton):

* **system** (``SystemSharedMemoryRegister``, ``/v2/systemsharedmemory``): ``(name, key, offset,
  byte_size)``; ``key`` is a POSIX shared memory object (``shm_open`` name; ``/dev/shm/<key>``), of
  which the server maps ``offset .. offset + byte_size`` read/write once, at registration. Checked then:
  the key is one path component, the object a regular file holding ``offset + byte_size`` bytes; and at
  each access, that the object has not shrunk since (a shrunk file would fault instead).
* **CUDA** (``CudaSharedMemoryRegister``, ``/v2/cudasharedmemory``): ``(name, raw_handle, device_id,
  byte_size)``; ``raw_handle`` is the 64-byte ``cudaIpcMemHandle_t`` of another process's device
  allocation, opened at registration on ``device_id`` (which must hold at least ``byte_size`` bytes from
  it) through :mod:`.cuda_runtime` and closed at unregistration. No CUDA device: registration is refused
  saying why.

Every access -- ``shared_memory_offset + shared_memory_byte_size`` of an input or output -- is checked
against its region's ``byte_size`` first (:meth:`Region.read` / :meth:`Region.write`). Inputs are
copied out of the region (a model never sees memory the client may rewrite while it computes, and
models get host tensors whatever the region); outputs are copied into it. Large system copies and every
CUDA call run in a worker thread. A region unregistered while a copy is in flight is released when that
copy ends.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelyard.server import cuda_runtime
from modelyard.server.cuda_runtime import IPC_HANDLE_SIZE, CudaError, CudaRuntime, CudaUnavailable
from modelyard.server.errors import AlreadyExists, InvalidInput, ModelyardError, NotFound

log = logging.getLogger("modelyard.server")

#: where POSIX shared memory objects live on Linux
SHM_DIR = Path("/dev/shm")
MAX_NAME = 128
MAX_KEY = 255
#: system shared memory copies larger than this go to a worker thread
INLINE_COPY_BYTES = 256 * 1024

#: request / output parameters of the extensions (Triton's names)
REGION_PARAM = "shared_memory_region"
SIZE_PARAM = "shared_memory_byte_size"
OFFSET_PARAM = "shared_memory_offset"
SHM_PARAMS = (REGION_PARAM, SIZE_PARAM, OFFSET_PARAM)

#: the kinds of region, as the API and its messages name them
SYSTEM = "system shared memory"
CUDA = "CUDA shared memory"


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidInput("shared memory region name is required")
    if len(name) > MAX_NAME or not name.isprintable() or "/" in name:
        raise InvalidInput(f"invalid shared memory region name {name[:MAX_NAME]!r}: printable, no '/', "
                           f"at most {MAX_NAME} characters")
    return name


def key_path(key: Any) -> Path:
    """``/dev/shm/<key>`` for a POSIX shared memory key (``/name`` or ``name``); refuses anything else."""
    if not isinstance(key, str) or not key:
        raise InvalidInput("shared memory 'key' is required")
    bare = key.lstrip("/")
    if (not bare or len(bare) > MAX_KEY or "/" in bare or "\x00" in bare or bare in (".", "..")
            or not bare.isprintable()):
        raise InvalidInput(f"invalid shared memory key {key[:MAX_KEY]!r}: must be a POSIX shared memory name "
                           "such as '/my_region' (one path component under /dev/shm)")
    return SHM_DIR / bare


def _int(value: Any, field: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{field} must be an integer, got {value!r}")
    if value < minimum:
        raise InvalidInput(f"{field} must be >= {minimum}, got {value}")
    return value


class Region:
    """One registered region: its name, kind and size, the bounds check every access goes through, and
    the accesses in flight (a closed region is released when the last one ends).

    A kind of memory subclasses it and provides ``_read(offset, size)`` and ``_write(offset, data)``
    (called with the bounds checked, never after release), ``_release()`` and its status fields."""

    kind = ""
    #: copies up to this many bytes run on the event loop, larger ones in a worker thread (-1: all)
    inline_bytes = INLINE_COPY_BYTES

    def __init__(self, name: str, byte_size: int) -> None:
        self.name, self.byte_size = name, byte_size
        self._users = 0
        self._lock = threading.Lock()
        self._closed = False

    # -------------------------------------------------------------- what a kind of memory provides
    def _read(self, offset: int, size: int) -> bytes | memoryview:
        raise NotImplementedError

    def _write(self, offset: int, data: bytes | memoryview) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    def _fields(self) -> dict[str, Any]:
        """Status fields besides ``name`` and ``byte_size``."""
        return {}

    def _check_backing(self, what: str) -> None:
        """InvalidInput if the memory behind the region can no longer be accessed safely."""

    # -------------------------------------------------------------- accesses
    def status(self) -> dict[str, Any]:
        return {"name": self.name, **self._fields(), "byte_size": self.byte_size}

    def check(self, offset: int, size: int, what: str) -> None:
        """InvalidInput unless ``size`` bytes at ``offset`` lie inside the region."""
        if offset + size > self.byte_size:
            raise InvalidInput(f"{what}: shared_memory_offset {offset} + shared_memory_byte_size {size} exceeds "
                               f"region '{self.name}' ({self.byte_size} bytes)")
        self._check_backing(what)

    def read(self, offset: int, size: int, what: str) -> bytes | memoryview:
        """A copy of ``size`` bytes at ``offset`` in the region."""
        self._enter()
        try:
            self.check(offset, size, what)
            return self._read(offset, size)
        finally:
            self._exit()

    def write(self, offset: int, data: bytes | memoryview, capacity: int, what: str) -> None:
        """Write ``data`` at ``offset``; ``capacity`` is the byte size the client set aside for it."""
        if len(data) > capacity:
            raise InvalidInput(f"{what}: output needs {len(data)} bytes but shared_memory_byte_size is {capacity}")
        self._enter()
        try:
            self.check(offset, capacity, what)
            self._write(offset, data)
        finally:
            self._exit()

    def close(self) -> None:
        """Release the region now, or when the accesses in flight end."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._users:
                return
        self._release()

    def _enter(self) -> None:
        with self._lock:
            if self._closed:
                raise InvalidInput(f"shared memory region '{self.name}' was unregistered")
            self._users += 1

    def _exit(self) -> None:
        with self._lock:
            self._users -= 1
            last = self._closed and self._users == 0
        if last:
            self._release()


class SystemRegion(Region):
    """``byte_size`` bytes at ``offset`` of a POSIX shared memory object, mapped read/write."""

    kind = SYSTEM

    def __init__(self, name: str, key: str, offset: int, byte_size: int) -> None:
        path = key_path(key)
        flags = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            raise InvalidInput(f"shared memory key {key!r} does not exist (no {path})") from None
        except OSError as exc:
            raise InvalidInput(f"shared memory key {key!r}: cannot open {path}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise InvalidInput(f"shared memory key {key!r} is not a shared memory object")
            if offset + byte_size > st.st_size:
                raise InvalidInput(
                    f"shared memory region '{name}': offset {offset} + byte_size {byte_size} exceeds the "
                    f"{st.st_size} bytes of key {key!r}")
            # mmap offsets must be page aligned: map from the page holding `offset`
            start = offset - offset % mmap.ALLOCATIONGRANULARITY
            self._map = mmap.mmap(fd, byte_size + offset - start, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
        except BaseException:
            os.close(fd)
            raise
        super().__init__(name, byte_size)
        self._fd = fd
        self.key, self.offset = key, offset
        self._skip = offset - start
        self._file_end = offset + byte_size

    def _fields(self) -> dict[str, Any]:
        return {"key": self.key, "offset": self.offset}

    def _check_backing(self, what: str) -> None:
        # the object may have been truncated since registration: touching a page past its end faults
        if os.fstat(self._fd).st_size < self._file_end:
            raise InvalidInput(f"{what}: shared memory key {self.key!r} shrank below region '{self.name}' "
                               "since it was registered; register it again")

    def _read(self, offset: int, size: int) -> bytes:
        start = self._skip + offset
        return self._map[start:start + size]

    def _write(self, offset: int, data: bytes | memoryview) -> None:
        start = self._skip + offset
        self._map[start:start + len(data)] = data

    def _release(self) -> None:
        self._map.close()
        os.close(self._fd)


class CudaRegion(Region):
    """``byte_size`` bytes of another process's CUDA allocation, opened from its IPC handle on
    ``device_id``. Copies go through host memory: models get host tensors, as from any other input."""

    kind = CUDA
    inline_bytes = -1  # every CUDA call waits on the driver or the device: none on the event loop

    def __init__(self, name: str, byte_size: int, device_id: int, runtime: CudaRuntime, ptr: int) -> None:
        super().__init__(name, byte_size)
        self.device_id = device_id
        self._rt, self._ptr = runtime, ptr

    @classmethod
    def open(cls, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> CudaRegion:
        """Open ``raw_handle`` on ``device_id`` (blocks: call it from a worker thread)."""
        failed = f"failed to register CUDA shared memory region '{name}'"
        try:
            rt = cuda_runtime.runtime()
        except CudaUnavailable as exc:
            raise InvalidInput(f"{failed}: CUDA shared memory needs a CUDA device: {exc}") from None
        try:
            ptr = rt.open_ipc_handle(raw_handle, device_id)
        except CudaError as exc:
            raise InvalidInput(f"{failed}: cannot open raw_handle on device {device_id}: {exc}") from None
        region = cls(name, byte_size, device_id, rt, ptr)
        try:
            available = rt.allocation_size(ptr, device_id)
        except CudaError as exc:
            region._release()
            raise InvalidInput(f"{failed}: {exc}") from None
        if byte_size > available:
            region._release()
            raise InvalidInput(f"{failed}: byte_size {byte_size} exceeds the {available} bytes of the allocation "
                               "raw_handle names")
        return region

    def _fields(self) -> dict[str, Any]:
        return {"device_id": self.device_id}

    def _read(self, offset: int, size: int) -> memoryview:
        try:
            return self._rt.to_host(self._ptr + offset, size, self.device_id)
        except CudaError as exc:
            raise ModelyardError(f"reading CUDA shared memory region '{self.name}': {exc}") from None

    def _write(self, offset: int, data: bytes | memoryview) -> None:
        try:
            self._rt.to_device(self._ptr + offset, data, self.device_id)
        except CudaError as exc:
            raise ModelyardError(f"writing CUDA shared memory region '{self.name}': {exc}") from None

    def _release(self) -> None:
        try:
            self._rt.close_ipc_handle(self._ptr, self.device_id)
        except CudaError as exc:  # may run at the end of a copy, in a worker thread: nobody to answer
            log.warning("closing CUDA shared memory region '%s': %s", self.name, exc)


@dataclass(frozen=True, slots=True)
class ShmRef:
    """Where one tensor lives in shared memory, as a request named it."""

    region: str
    byte_size: int
    offset: int = 0

    @classmethod
    def from_parameters(cls, params: dict[str, Any], what: str) -> ShmRef | None:
        """The reference in an input's or output's parameters; None when they name no region."""
        region = params.get(REGION_PARAM)
        if region is None:
            if SIZE_PARAM in params or OFFSET_PARAM in params:
                raise InvalidInput(f"{what}: shared_memory_byte_size/offset given without shared_memory_region")
            return None
        if not isinstance(region, str) or not region:
            raise InvalidInput(f"{what}: parameter shared_memory_region must be a region name, got {region!r}")
        if SIZE_PARAM not in params:
            raise InvalidInput(f"{what}: parameter shared_memory_byte_size is required with shared_memory_region")
        size = _int(params[SIZE_PARAM], f"{what}: parameter shared_memory_byte_size", minimum=0)
        offset = _int(params.get(OFFSET_PARAM, 0), f"{what}: parameter shared_memory_offset", minimum=0)
        return cls(region, size, offset)


def _close_all(regions: list[Region]) -> None:
    for region in regions:
        region.close()


class SharedMemoryRegistry:
    """The regions registered with one server, of both kinds (event-loop thread; copies, CUDA calls and
    releases may run in worker threads)."""

    def __init__(self) -> None:
        self._regions: dict[str, Region] = {}

    def add(self, region: Region) -> None:
        """Register ``region`` under its name."""
        self._check_free(region.name)
        self._regions[region.name] = region

    def _check_free(self, name: str) -> None:
        """AlreadyExists when ``name`` is registered, as either kind."""
        other = self._regions.get(name)
        if other is not None:
            raise AlreadyExists(f"shared memory region '{name}' is already registered (as {other.kind}); "
                                "unregister it first")

    def register_system(self, name: Any, key: Any, offset: Any, byte_size: Any) -> None:
        name = _check_name(name)
        offset = _int(offset, "offset", minimum=0)
        byte_size = _int(byte_size, "byte_size", minimum=1)
        self._check_free(name)
        self.add(SystemRegion(name, key, offset, byte_size))

    async def register_cuda(self, name: Any, raw_handle: Any, device_id: Any, byte_size: Any) -> None:
        name = _check_name(name)
        if not isinstance(raw_handle, bytes) or len(raw_handle) != IPC_HANDLE_SIZE:
            got = f"{len(raw_handle)} bytes" if isinstance(raw_handle, bytes) else repr(raw_handle)[:40]
            raise InvalidInput(f"raw_handle must be the {IPC_HANDLE_SIZE} bytes of a cudaIpcMemHandle_t, got {got}")
        device_id = _int(device_id, "device_id", minimum=0)
        byte_size = _int(byte_size, "byte_size", minimum=1)
        self._check_free(name)
        loop = asyncio.get_running_loop()
        region = await loop.run_in_executor(None, CudaRegion.open, name, raw_handle, device_id, byte_size)
        try:
            self.add(region)  # the name may have been registered while the handle was being opened
        except AlreadyExists:
            await loop.run_in_executor(None, region.close)
            raise

    async def unregister(self, kind: str, name: str = "") -> None:
        """Unregister ``name`` (every region of ``kind`` when empty). A name that is not registered, or is
        registered as the other kind, is left alone without error, as in Triton."""
        names = [name] if name else list(self._regions)
        closing = [self._regions.pop(n) for n in names if n in self._regions and self._regions[n].kind == kind]
        if closing:
            await asyncio.get_running_loop().run_in_executor(None, _close_all, closing)

    def status(self, kind: str, name: str = "") -> list[dict[str, Any]]:
        """The status of region ``name`` (NotFound unless it is registered as ``kind``), or of every
        region of ``kind``."""
        if not name:
            return [r.status() for _, r in sorted(self._regions.items()) if r.kind == kind]
        region = self._regions.get(name)
        if region is None:
            raise NotFound(f"{kind} region '{name}' is not registered")
        if region.kind != kind:
            raise NotFound(f"the region named '{name}' is registered as {region.kind}, not {kind}")
        return [region.status()]

    def get(self, name: str, what: str) -> Region:
        """The region an input or output names, of either kind."""
        region = self._regions.get(name)
        if region is None:
            raise InvalidInput(f"{what}: shared_memory_region '{name}' is not registered")
        return region

    def close(self) -> None:
        """Release every region (blocks on CUDA calls: call it from a worker thread)."""
        regions = list(self._regions.values())
        self._regions.clear()
        _close_all(regions)

    # -------------------------------------------------------------- tensor copies
    async def read(self, ref: ShmRef, what: str) -> bytes | memoryview:
        region = self.get(ref.region, what)
        if ref.byte_size > region.inline_bytes:
            return await asyncio.get_running_loop().run_in_executor(None, region.read, ref.offset, ref.byte_size, what)
        return region.read(ref.offset, ref.byte_size, what)

    async def write(self, ref: ShmRef, data: bytes | memoryview, what: str) -> None:
        region = self.get(ref.region, what)
        if len(data) > region.inline_bytes:
            await asyncio.get_running_loop().run_in_executor(None, region.write, ref.offset, data, ref.byte_size, what)
        else:
            region.write(ref.offset, data, ref.byte_size, what)
