"""The few CUDA calls behind CUDA shared memory, through ctypes on ``libcudart``: modelyard installs and
imports without any CUDA package.

The library is looked for on first use: the ``nvidia-cuda-runtime`` wheel (what a CUDA build of torch
loads), torch's own ``lib`` directory, then the system loader's path. Where none loads or none sees a
device, :func:`runtime` raises :class:`CudaUnavailable` saying why.

Every call here blocks (the first initialises the driver; copies wait for the device): make them from a
worker thread, never from the event loop.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

#: bytes of a ``cudaIpcMemHandle_t``
IPC_HANDLE_SIZE = 64
_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 1
_MEMCPY_HOST_TO_DEVICE = 1
_MEMCPY_DEVICE_TO_HOST = 2
_SYSTEM_NAMES = ("libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0")


class CudaError(RuntimeError):
    """A CUDA call failed; the message names the call and CUDA's error string."""


class CudaUnavailable(CudaError):
    """No CUDA runtime library loads, or none sees a device."""


class IpcMemHandle(ctypes.Structure):
    """``cudaIpcMemHandle_t``: 64 opaque bytes, passed by value."""

    _fields_ = [("reserved", ctypes.c_char * IPC_HANDLE_SIZE)]


def library_candidates() -> list[str]:
    """Paths and names libcudart may load from, most specific first."""
    found: list[str] = []
    for package, pattern in (("nvidia", "*/lib/libcudart.so*"), ("torch", "lib/libcudart*.so*")):
        spec = importlib.util.find_spec(package)  # finds without importing
        for base in (spec.submodule_search_locations or []) if spec is not None else []:
            found += sorted(str(p) for p in Path(base).glob(pattern))
    system = ctypes.util.find_library("cudart")
    return list(dict.fromkeys([*found, *([system] if system else []), *_SYSTEM_NAMES]))


class CudaRuntime:
    """The calls CUDA shared memory makes, each raising :class:`CudaError` on failure."""

    def __init__(self, lib: ctypes.CDLL, path: str) -> None:
        self.lib, self.path = lib, path
        c = ctypes
        lib.cudaGetErrorString.argtypes, lib.cudaGetErrorString.restype = [c.c_int], c.c_char_p
        for name, args in (("cudaGetDeviceCount", [c.POINTER(c.c_int)]),
                           ("cudaSetDevice", [c.c_int]),
                           ("cudaIpcOpenMemHandle", [c.POINTER(c.c_void_p), IpcMemHandle, c.c_uint]),
                           ("cudaIpcCloseMemHandle", [c.c_void_p]),
                           ("cudaMemcpy", [c.c_void_p, c.c_void_p, c.c_size_t, c.c_int])):
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, c.c_int
        self._address_range: Callable[..., int] | None = None  # libcuda's, loaded on first use

    def call(self, name: str, *args: object) -> None:
        """Call libcudart function ``name``; CudaError unless it answers cudaSuccess."""
        err = getattr(self.lib, name)(*args)
        if err != 0:
            text = self.lib.cudaGetErrorString(err)
            raise CudaError(f"{name}: {text.decode() if text else f'error {err}'}")

    def device_count(self) -> int:
        n = ctypes.c_int(0)
        self.call("cudaGetDeviceCount", ctypes.byref(n))
        return n.value

    def open_ipc_handle(self, handle: bytes, device_id: int) -> int:
        """Map another process's allocation into this one; its device address here."""
        self.call("cudaSetDevice", device_id)
        ptr = ctypes.c_void_p()
        self.call("cudaIpcOpenMemHandle", ctypes.byref(ptr), IpcMemHandle.from_buffer_copy(handle),
                   _IPC_MEM_LAZY_ENABLE_PEER_ACCESS)
        if not ptr.value:
            raise CudaError("cudaIpcOpenMemHandle: returned a null pointer")
        return ptr.value

    def close_ipc_handle(self, ptr: int, device_id: int) -> None:
        self.call("cudaSetDevice", device_id)
        self.call("cudaIpcCloseMemHandle", ptr)

    def allocation_size(self, ptr: int, device_id: int) -> int:
        """Bytes of the allocation that starts at ``ptr`` (libcuda's ``cuMemGetAddressRange``)."""
        if self._address_range is None:
            fn = ctypes.CDLL("libcuda.so.1").cuMemGetAddressRange_v2
            fn.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t), ctypes.c_uint64]
            fn.restype = ctypes.c_int
            self._address_range = fn
        self.call("cudaSetDevice", device_id)  # makes the device's context current for the driver call
        base, size = ctypes.c_uint64(), ctypes.c_size_t()
        err = self._address_range(ctypes.byref(base), ctypes.byref(size), ptr)
        if err != 0:
            raise CudaError(f"cuMemGetAddressRange: CUresult {err}")
        return size.value - (ptr - base.value)

    def to_host(self, src: int, size: int, device_id: int) -> memoryview:
        """A host copy of ``size`` bytes at device address ``src``."""
        out = np.empty(size, dtype=np.uint8)
        if size:
            self.call("cudaSetDevice", device_id)
            self.call("cudaMemcpy", out.ctypes.data, src, size, _MEMCPY_DEVICE_TO_HOST)
        return out.data

    def to_device(self, dst: int, data: bytes | memoryview, device_id: int) -> None:
        """Copy ``data`` to device address ``dst``."""
        src = np.frombuffer(data, dtype=np.uint8)  # no copy; read-only buffers too
        if src.size:
            self.call("cudaSetDevice", device_id)
            self.call("cudaMemcpy", dst, src.ctypes.data, src.size, _MEMCPY_HOST_TO_DEVICE)


_lock = threading.Lock()
_loaded: tuple[CudaRuntime | None, str] | None = None


def _load() -> tuple[CudaRuntime | None, str]:
    try:
        ctypes.CDLL("libcuda.so.1")  # without the driver libcudart only says "driver version is insufficient"
    except OSError:
        return None, "no CUDA driver (libcuda.so.1 does not load)"
    # why each library that loaded was no use, and the first that said so (the same library often
    # loads under several names)
    reasons: dict[str, str] = {}
    for candidate in library_candidates():
        try:
            lib = ctypes.CDLL(candidate)
        except OSError:
            continue
        try:
            rt = CudaRuntime(lib, candidate)
            if rt.device_count() > 0:
                return rt, ""
            reasons.setdefault("no CUDA device", candidate)
        except (AttributeError, CudaError) as exc:  # AttributeError: not a (complete) libcudart
            reasons.setdefault(str(exc), candidate)
    if not reasons:
        return None, ("no libcudart found (looked for the nvidia-cuda-runtime wheel, torch's lib directory "
                      "and libcudart.so on the loader path)")
    return None, "; ".join(f"{why} ({where})" for why, where in reasons.items())


def runtime() -> CudaRuntime:
    """This process's CUDA runtime, loaded on first call; :class:`CudaUnavailable` says why there is none."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _load()
        rt, reason = _loaded
    if rt is None:
        raise CudaUnavailable(reason)
    return rt
