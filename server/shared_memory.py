"""Triton's system shared memory extension: regions in ``/dev/shm`` that clients register by name,
then name in a request instead of sending the tensor's bytes.

A region is ``(name, key, offset, byte_size)``: ``key`` is the POSIX shared memory object
(``shm_open`` name; ``/dev/shm/<key>``), ``offset``/``byte_size`` the part of it the region covers.
The server maps that part read/write once, at registration, and checks every access against it:

* registration: the name is printable and at most 128 characters, the key is one path component
  (``/name`` or ``name``), the object is a regular file, and ``offset + byte_size`` lies inside it;
* each input or output: ``shared_memory_offset + shared_memory_byte_size`` lies inside the region,
  and the object has not shrunk since registration (a shrunk file would fault on access instead).

Inputs are copied out of the region (a model never sees memory the client may rewrite while it
computes); outputs are copied into it. Copies of large tensors run in a worker thread.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelyard.server.errors import AlreadyExists, InvalidInput, NotFound

#: where POSIX shared memory objects live on Linux
SHM_DIR = Path("/dev/shm")
MAX_NAME = 128
MAX_KEY = 255
#: copies larger than this go to a worker thread
INLINE_COPY_BYTES = 256 * 1024

#: request / output parameters of the extension (Triton's names)
REGION_PARAM = "shared_memory_region"
SIZE_PARAM = "shared_memory_byte_size"
OFFSET_PARAM = "shared_memory_offset"
SHM_PARAMS = (REGION_PARAM, SIZE_PARAM, OFFSET_PARAM)


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
    """One registered region: its mapping and the bounds every access is checked against."""

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
        self._fd = fd
        self.name, self.key, self.offset, self.byte_size = name, key, offset, byte_size
        self._skip = offset - start
        self._file_end = offset + byte_size
        # accesses in flight (worker threads); close waits for them
        self._users = 0
        self._lock = threading.Lock()
        self._closed = False

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}

    def check(self, offset: int, size: int, what: str) -> None:
        """InvalidInput unless ``size`` bytes at ``offset`` lie inside the region."""
        self._span(offset, size, what)

    def _span(self, offset: int, size: int, what: str) -> tuple[int, int]:
        if offset + size > self.byte_size:
            raise InvalidInput(f"{what}: shared_memory_offset {offset} + shared_memory_byte_size {size} exceeds "
                               f"region '{self.name}' ({self.byte_size} bytes)")
        # the object may have been truncated since registration: touching a page past its end faults
        if os.fstat(self._fd).st_size < self._file_end:
            raise InvalidInput(f"{what}: shared memory key {self.key!r} shrank below region '{self.name}' "
                               "since it was registered; register it again")
        start = self._skip + offset
        return start, start + size

    def _enter(self) -> None:
        with self._lock:
            if self._closed:
                raise InvalidInput(f"shared memory region '{self.name}' was unregistered")
            self._users += 1

    def _exit(self) -> None:
        with self._lock:
            self._users -= 1
            if self._closed and self._users == 0:
                self._release()

    def read(self, offset: int, size: int, what: str) -> bytes:
        """A copy of ``size`` bytes at ``offset`` in the region."""
        self._enter()
        try:
            start, end = self._span(offset, size, what)
            return self._map[start:end]
        finally:
            self._exit()

    def write(self, offset: int, data: bytes | memoryview, capacity: int, what: str) -> None:
        """Write ``data`` at ``offset``; ``capacity`` is the byte size the client set aside for it."""
        if len(data) > capacity:
            raise InvalidInput(f"{what}: output needs {len(data)} bytes but shared_memory_byte_size is {capacity}")
        self._enter()
        try:
            start, _ = self._span(offset, capacity, what)
            self._map[start:start + len(data)] = data
        finally:
            self._exit()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._users == 0:
                self._release()

    def _release(self) -> None:
        self._map.close()
        os.close(self._fd)


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


class SharedMemoryRegistry:
    """The regions registered with one server (event-loop thread; copies may run in worker threads)."""

    def __init__(self) -> None:
        self._regions: dict[str, Region] = {}

    def register(self, name: Any, key: Any, offset: Any, byte_size: Any) -> None:
        name = _check_name(name)
        offset = _int(offset, "offset", minimum=0)
        byte_size = _int(byte_size, "byte_size", minimum=1)
        if name in self._regions:
            raise AlreadyExists(f"shared memory region '{name}' is already registered; unregister it first")
        self._regions[name] = Region(name, key, offset, byte_size)

    def unregister(self, name: str = "") -> None:
        """Unregister ``name`` (every region when empty); unknown names are not an error, as in Triton."""
        names = [name] if name else list(self._regions)
        for n in names:
            region = self._regions.pop(n, None)
            if region is not None:
                region.close()

    def status(self, name: str = "") -> list[dict[str, Any]]:
        if name:
            return [self.get(name, "status").status()]
        return [r.status() for _, r in sorted(self._regions.items())]

    def get(self, name: str, what: str) -> Region:
        region = self._regions.get(name)
        if region is None:
            if what == "status":
                raise NotFound(f"shared memory region '{name}' is not registered")
            raise InvalidInput(f"{what}: shared_memory_region '{name}' is not registered")
        return region

    def close(self) -> None:
        self.unregister()

    # -------------------------------------------------------------- tensor copies
    async def read(self, ref: ShmRef, what: str) -> bytes:
        region = self.get(ref.region, what)
        if ref.byte_size > INLINE_COPY_BYTES:
            return await asyncio.get_running_loop().run_in_executor(None, region.read, ref.offset, ref.byte_size, what)
        return region.read(ref.offset, ref.byte_size, what)

    async def write(self, ref: ShmRef, data: bytes | memoryview, what: str) -> None:
        region = self.get(ref.region, what)
        if len(data) > INLINE_COPY_BYTES:
            await asyncio.get_running_loop().run_in_executor(None, region.write, ref.offset, data, ref.byte_size, what)
        else:
            region.write(ref.offset, data, ref.byte_size, what)
