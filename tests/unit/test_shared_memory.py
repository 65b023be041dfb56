"""The shared memory registry: one bounds check and one name space for system and CUDA regions, Triton's
per-kind status and unregister, and CUDA regions driven through a fake device (no GPU needed)."""

from __future__ import annotations

import ctypes
import threading

import pytest

from modelyard.server import cuda_runtime
from modelyard.server.cuda_runtime import CudaRuntime, CudaUnavailable, IpcMemHandle
from modelyard.server.errors import AlreadyExists, InvalidInput, NotFound
from modelyard.server.shared_memory import CUDA, SYSTEM, Region, SharedMemoryRegistry, ShmRef

HANDLE = bytes(range(64))


class BytesRegion(Region):
    """A region over a bytearray."""

    def __init__(self, name: str, byte_size: int, kind: str = CUDA) -> None:
        super().__init__(name, byte_size)
        self.kind = kind
        self.mem = bytearray(byte_size)
        self.released = False

    def _read(self, offset: int, size: int) -> bytes:
        return bytes(self.mem[offset:offset + size])

    def _write(self, offset: int, data: bytes | memoryview) -> None:
        self.mem[offset:offset + len(data)] = data

    def _release(self) -> None:
        self.released = True


class FakeDevice:
    """Stands in for :class:`CudaRuntime`: one allocation of ``size`` bytes behind ``HANDLE``."""

    BASE = 0x7F00_0000_0000

    def __init__(self, size: int) -> None:
        self.mem = bytearray(size)
        self.devices: set[int] = set()
        self.copy_threads: set[int] = set()
        self.closed: list[tuple[int, int]] = []

    def open_ipc_handle(self, handle: bytes, device_id: int) -> int:
        assert handle == HANDLE
        self.devices.add(device_id)
        return self.BASE

    def allocation_size(self, ptr: int, device_id: int) -> int:
        return len(self.mem) - (ptr - self.BASE)

    def to_host(self, src: int, size: int, device_id: int) -> memoryview:
        self.devices.add(device_id)
        self.copy_threads.add(threading.get_ident())
        start = src - self.BASE
        return memoryview(bytes(self.mem[start:start + size]))

    def to_device(self, dst: int, data: bytes | memoryview, device_id: int) -> None:
        self.devices.add(device_id)
        self.copy_threads.add(threading.get_ident())
        start = dst - self.BASE
        self.mem[start:start + len(data)] = data

    def close_ipc_handle(self, ptr: int, device_id: int) -> None:
        self.closed.append((ptr, device_id))


@pytest.fixture
def device(monkeypatch: pytest.MonkeyPatch) -> FakeDevice:
    fake = FakeDevice(64)
    monkeypatch.setattr(cuda_runtime, "runtime", lambda: fake)
    return fake


def test_access_outside_a_region_is_refused_naming_the_tensor():
    region = BytesRegion("r", 16)
    region.write(4, b"abcd", 8, "output 'OUT'")
    assert region.read(4, 4, "input 'IN'") == b"abcd"
    with pytest.raises(InvalidInput, match=r"input 'IN': shared_memory_offset 12 \+ shared_memory_byte_size 8 "
                                           r"exceeds region 'r' \(16 bytes\)"):
        region.read(12, 8, "input 'IN'")
    with pytest.raises(InvalidInput, match="output 'OUT': output needs 5 bytes but shared_memory_byte_size is 4"):
        region.write(0, b"12345", 4, "output 'OUT'")
    # the whole capacity the client set aside must fit, not only what is written
    with pytest.raises(InvalidInput, match="shared_memory_offset 8 \\+ shared_memory_byte_size 12"):
        region.write(8, b"1", 12, "output 'OUT'")
    assert region.mem[8:] == bytes(8)


def test_region_unregistered_during_a_copy_is_released_when_the_copy_ends():
    region = BytesRegion("r", 16)
    region._enter()  # a copy in flight
    region.close()
    assert not region.released
    region._exit()
    assert region.released
    with pytest.raises(InvalidInput, match="'r' was unregistered"):
        region.read(0, 4, "input 'IN'")


async def test_names_are_unique_across_system_and_cuda_regions():
    shm = SharedMemoryRegistry()
    shm.add(BytesRegion("a", 16, CUDA))
    with pytest.raises(AlreadyExists, match="'a' is already registered \\(as CUDA shared memory\\)"):
        shm.register_system("a", "/no_such_key", 0, 16)  # refused before the key is opened
    with pytest.raises(AlreadyExists, match="as CUDA shared memory"):
        await shm.register_cuda("a", HANDLE, 0, 16)
    # an input may name a region of either kind
    assert shm.get("a", "input 'IN'").kind == CUDA


async def test_status_and_unregister_see_only_their_own_kind():
    shm = SharedMemoryRegistry()
    system, cuda = BytesRegion("s", 8, SYSTEM), BytesRegion("c", 8, CUDA)
    shm.add(system)
    shm.add(cuda)
    assert [r["name"] for r in shm.status(SYSTEM)] == ["s"]
    assert shm.status(CUDA, "c") == [{"name": "c", "byte_size": 8}]
    with pytest.raises(NotFound, match="the region named 's' is registered as system shared memory, "
                                       "not CUDA shared memory"):
        shm.status(CUDA, "s")
    with pytest.raises(NotFound, match="CUDA shared memory region 'nope' is not registered"):
        shm.status(CUDA, "nope")
    await shm.unregister(CUDA, "s")     # the other kind: left alone, no error (Triton)
    await shm.unregister(CUDA, "nope")  # unknown: no error
    assert not system.released
    await shm.unregister(CUDA)          # every CUDA region, no system one
    assert cuda.released and not system.released
    assert shm.status(CUDA) == [] and [r["name"] for r in shm.status(SYSTEM)] == ["s"]
    shm.close()
    assert system.released


async def test_cuda_region_copies_at_the_requested_offset_on_its_device_off_the_event_loop(device: FakeDevice):
    shm = SharedMemoryRegistry()
    await shm.register_cuda("c", HANDLE, 1, 48)
    assert shm.status(CUDA) == [{"name": "c", "device_id": 1, "byte_size": 48}]
    await shm.write(ShmRef("c", 8, 16), b"ABCDEFGH", "output 'OUT'")
    assert device.mem[16:24] == b"ABCDEFGH" and device.mem[:16] == bytes(16)
    device.mem[40:44] = b"wxyz"
    assert bytes(await shm.read(ShmRef("c", 4, 40), "input 'IN'")) == b"wxyz"
    with pytest.raises(InvalidInput, match="exceeds region 'c' \\(48 bytes\\)"):
        await shm.read(ShmRef("c", 8, 44), "input 'IN'")
    assert device.devices == {1}
    assert threading.get_ident() not in device.copy_threads
    await shm.unregister(CUDA, "c")
    assert device.closed == [(FakeDevice.BASE, 1)]


async def test_cuda_region_larger_than_its_allocation_is_refused_and_its_handle_closed(device: FakeDevice):
    shm = SharedMemoryRegistry()
    with pytest.raises(InvalidInput, match="failed to register CUDA shared memory region 'c': byte_size 65 "
                                           "exceeds the 64 bytes of the allocation raw_handle names"):
        await shm.register_cuda("c", HANDLE, 0, 65)
    assert device.closed == [(FakeDevice.BASE, 0)] and shm.status(CUDA) == []


@pytest.mark.parametrize(("handle", "device_id", "byte_size", "message"), [
    (b"short", 0, 16, "raw_handle must be the 64 bytes of a cudaIpcMemHandle_t, got 5 bytes"),
    ("text", 0, 16, "raw_handle must be the 64 bytes"),
    (HANDLE, -1, 16, "device_id must be >= 0, got -1"),
    (HANDLE, 0, 0, "byte_size must be >= 1, got 0"),
])
async def test_cuda_registration_checks_its_arguments_before_any_cuda_call(device, handle, device_id, byte_size,
                                                                           message):
    with pytest.raises(InvalidInput, match=message):
        await SharedMemoryRegistry().register_cuda("c", handle, device_id, byte_size)
    assert not device.devices


async def test_without_cuda_registration_says_what_is_missing(monkeypatch: pytest.MonkeyPatch):
    def unavailable() -> CudaRuntime:
        raise CudaUnavailable("no libcudart found")

    monkeypatch.setattr(cuda_runtime, "runtime", unavailable)
    shm = SharedMemoryRegistry()
    with pytest.raises(InvalidInput, match="failed to register CUDA shared memory region 'c': CUDA shared memory "
                                           "needs a CUDA device: no libcudart found"):
        await shm.register_cuda("c", HANDLE, 0, 16)
    assert shm.status(CUDA) == []


def test_libcudart_binding_answers_errors_without_crashing():
    """The real ctypes binding where a libcudart loads (with or without a device): the handle goes by
    value, failures come back as CudaError naming the call."""
    for candidate in cuda_runtime.library_candidates():
        try:
            lib = ctypes.CDLL(candidate)
            break
        except OSError:
            continue
    else:
        pytest.skip("no libcudart on this machine")
    rt = CudaRuntime(lib, candidate)
    ptr = ctypes.c_void_p()
    # an all-zero handle names no allocation: an error code, never a crash
    assert lib.cudaIpcOpenMemHandle(ctypes.byref(ptr), IpcMemHandle.from_buffer_copy(bytes(64)), 1) != 0
    with pytest.raises(cuda_runtime.CudaError, match=r"^cuda[A-Za-z]+: "):
        rt.open_ipc_handle(bytes(64), 0)
    assert bytes(rt.to_host(0, 0, 0)) == b""  # nothing to copy: no CUDA call
