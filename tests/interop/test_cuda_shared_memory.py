"""Triton's CUDA shared memory extension against a real ``modelyard serve``, with tritonclient.

With a CUDA device, the client allocates device memory (tritonclient's ``cuda_shared_memory`` utils where
``cuda-python`` is installed, else libcudart through ctypes), registers its IPC handle and infers from and
into it at offsets. Without one, registration is a clear INVALID_ARGUMENT / 400 and status answers.
"""

from __future__ import annotations

import base64
import ctypes
import uuid
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as system_shm
from tritonclient.utils import InferenceServerException

from modelyard.server import cuda_runtime


def _cuda_missing() -> str:
    """Why this machine cannot run the CUDA path ("" when it can)."""
    try:
        cuda_runtime.runtime()
    except cuda_runtime.CudaUnavailable as exc:
        return str(exc)
    return ""


MISSING = _cuda_missing()
needs_cuda = pytest.mark.skipif(bool(MISSING), reason=f"needs a CUDA device: {MISSING}")
needs_no_cuda = pytest.mark.skipif(not MISSING, reason="checks the answer of a server without a CUDA device")


class DeviceBuffer:
    """``byte_size`` bytes of device memory on ``device_id`` from libcudart through ctypes, zeroed."""

    def __init__(self, byte_size: int, device_id: int = 0) -> None:
        rt = self.rt = cuda_runtime.runtime()
        lib = rt.lib
        lib.cudaMalloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
        lib.cudaFree.argtypes = [ctypes.c_void_p]
        lib.cudaIpcGetMemHandle.argtypes = [ctypes.POINTER(cuda_runtime.IpcMemHandle), ctypes.c_void_p]
        self.device_id = device_id
        rt.call("cudaSetDevice", device_id)
        ptr = ctypes.c_void_p()
        rt.call("cudaMalloc", ctypes.byref(ptr), byte_size)
        self.ptr = ptr.value
        handle = cuda_runtime.IpcMemHandle()
        rt.call("cudaIpcGetMemHandle", ctypes.byref(handle), self.ptr)
        #: base64 of the handle's 64 bytes, as tritonclient's ``get_raw_handle`` gives it
        self.raw_handle = base64.b64encode(bytes(handle))
        rt.to_device(self.ptr, bytes(byte_size), device_id)

    def set(self, array: np.ndarray, offset: int = 0) -> None:
        self.rt.to_device(self.ptr + offset, np.ascontiguousarray(array).tobytes(), self.device_id)

    def get(self, dtype: type, shape: list[int], offset: int = 0) -> np.ndarray:
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return np.frombuffer(self.rt.to_host(self.ptr + offset, size, self.device_id), dtype=dtype).reshape(shape)

    def free(self) -> None:
        self.rt.call("cudaSetDevice", self.device_id)
        self.rt.call("cudaFree", self.ptr)


class TritonclientBuffer:
    """The same through tritonclient's ``cuda_shared_memory`` utils (they need ``cuda-python``); those
    copy from offset 0 only, so offsets go through a byte view of the whole region."""

    def __init__(self, byte_size: int, device_id: int = 0) -> None:
        import tritonclient.utils.cuda_shared_memory as cudashm

        self.cudashm, self.byte_size, self.device_id = cudashm, byte_size, device_id
        self.handle = cudashm.create_shared_memory_region(f"t_{uuid.uuid4().hex[:8]}", byte_size, device_id)
        self.raw_handle = cudashm.get_raw_handle(self.handle)
        cudashm.set_shared_memory_region(self.handle, [np.zeros(byte_size, dtype=np.uint8)])

    def _bytes(self) -> np.ndarray:
        return self.cudashm.get_contents_as_numpy(self.handle, np.uint8, [self.byte_size])

    def set(self, array: np.ndarray, offset: int = 0) -> None:
        whole = self._bytes().copy()
        raw = np.frombuffer(np.ascontiguousarray(array).tobytes(), dtype=np.uint8)
        whole[offset:offset + raw.size] = raw
        self.cudashm.set_shared_memory_region(self.handle, [whole])

    def get(self, dtype: type, shape: list[int], offset: int = 0) -> np.ndarray:
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return self._bytes()[offset:offset + size].view(dtype).reshape(shape)

    def free(self) -> None:
        self.cudashm.destroy_shared_memory_region(self.handle)


def _buffer_class() -> type[DeviceBuffer] | type[TritonclientBuffer]:
    try:
        import tritonclient.utils.cuda_shared_memory  # noqa: F401  (RuntimeError without cuda-python)
    except (ImportError, RuntimeError):
        return DeviceBuffer
    return TritonclientBuffer


@pytest.fixture
def device() -> Iterator[Callable[[int], DeviceBuffer | TritonclientBuffer]]:
    """``make(byte_size)``: zeroed device memory on device 0, freed at teardown."""
    made: list[DeviceBuffer | TritonclientBuffer] = []
    cls = _buffer_class()

    def make(byte_size: int) -> DeviceBuffer | TritonclientBuffer:
        made.append(cls(byte_size))
        return made[-1]

    yield make
    for buf in made:
        buf.free()


@pytest.fixture(scope="module")
def client(demo_server):
    c = httpclient.InferenceServerClient(demo_server.http_url.removeprefix("http://"))
    yield c
    c.close()


@pytest.fixture(scope="module")
def grpc_client(demo_server):
    c = grpcclient.InferenceServerClient(demo_server.grpc_url)
    yield c
    c.close()


@needs_cuda
def test_cuda_shared_memory_over_http_inputs_and_outputs_at_offsets(client, device):
    array = np.arange(1024, dtype=np.float32).reshape(32, 32)
    inbuf, outbuf = device(array.nbytes + 64), device(array.nbytes + 128)
    inbuf.set(array, offset=64)
    client.unregister_cuda_shared_memory()
    client.register_cuda_shared_memory("cuda_in", inbuf.raw_handle, 0, array.nbytes + 64)
    client.register_cuda_shared_memory("cuda_out", outbuf.raw_handle, 0, array.nbytes + 128)
    try:
        status = {r["name"]: r for r in client.get_cuda_shared_memory_status()}
        assert status["cuda_out"] == {"name": "cuda_out", "device_id": 0, "byte_size": array.nbytes + 128}
        assert client.get_cuda_shared_memory_status("cuda_in")[0]["byte_size"] == array.nbytes + 64
        assert client.get_system_shared_memory_status() == []  # CUDA regions are not system ones
        inp = httpclient.InferInput("INPUT0", [32, 32], "FP32")
        inp.set_shared_memory("cuda_in", array.nbytes, offset=64)
        out = httpclient.InferRequestedOutput("OUTPUT0")
        out.set_shared_memory("cuda_out", array.nbytes, offset=128)
        result = client.infer("identity", [inp], outputs=[out])
        meta = result.get_output("OUTPUT0")
        assert meta["shape"] == [32, 32] and meta["datatype"] == "FP32"
        assert meta["parameters"]["shared_memory_region"] == "cuda_out"
        np.testing.assert_array_equal(outbuf.get(np.float32, [32, 32], offset=128), array)
        assert not outbuf.get(np.uint8, [128]).any()  # nothing written before the offset
        with pytest.raises(InferenceServerException) as err:
            client.register_cuda_shared_memory("cuda_in", inbuf.raw_handle, 0, array.nbytes)
        assert err.value.status() == "409"
        # past the end of the region: refused before any copy
        inp.set_shared_memory("cuda_in", array.nbytes, offset=128)
        with pytest.raises(InferenceServerException) as err:
            client.infer("identity", [inp], outputs=[out])
        assert err.value.status() == "400" and "exceeds region 'cuda_in'" in err.value.message()
    finally:
        client.unregister_cuda_shared_memory("cuda_in")
        client.unregister_cuda_shared_memory()
    assert client.get_cuda_shared_memory_status() == []


@needs_cuda
def test_cuda_shared_memory_over_grpc_mixed_with_raw_inputs(demo_server, grpc_client, device):
    a, b = np.arange(4, dtype=np.float32), np.full(4, 10, dtype=np.float32)
    inbuf, outbuf = device(64), device(64)
    inbuf.set(b, offset=16)
    g = grpc_client
    g.register_cuda_shared_memory("g_cuda_in", inbuf.raw_handle, 0, 64)
    g.register_cuda_shared_memory("g_cuda_out", outbuf.raw_handle, 0, 64)
    try:
        status = g.get_cuda_shared_memory_status()
        assert set(status.regions) == {"g_cuda_in", "g_cuda_out"}
        assert status.regions["g_cuda_in"].byte_size == 64 and status.regions["g_cuda_in"].device_id == 0
        inputs = [grpcclient.InferInput("INPUT0", [4], "FP32"), grpcclient.InferInput("INPUT1", [4], "FP32")]
        inputs[0].set_data_from_numpy(a)                         # raw_input_contents
        inputs[1].set_shared_memory("g_cuda_in", 16, offset=16)  # CUDA shared memory
        outs = [grpcclient.InferRequestedOutput("OUTPUT0"), grpcclient.InferRequestedOutput("OUTPUT1")]
        outs[1].set_shared_memory("g_cuda_out", 16, offset=8)
        result = g.infer("add_sub", inputs, outputs=outs)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
        np.testing.assert_array_equal(outbuf.get(np.float32, [4], offset=8), a - b)
        # a region registered over gRPC is usable over REST too
        h = httpclient.InferenceServerClient(demo_server.http_url.removeprefix("http://"))
        try:
            assert {r["name"] for r in h.get_cuda_shared_memory_status()} == {"g_cuda_in", "g_cuda_out"}
        finally:
            h.close()
    finally:
        g.unregister_cuda_shared_memory()
    assert len(g.get_cuda_shared_memory_status().regions) == 0


@needs_no_cuda
def test_without_a_cuda_device_register_is_a_clear_error_and_status_answers(client, grpc_client):
    handle = base64.b64encode(bytes(64))
    with pytest.raises(InferenceServerException) as err:
        client.register_cuda_shared_memory("nocuda", handle, 0, 64)
    assert err.value.status() == "400", err.value.message()
    assert ("failed to register CUDA shared memory region 'nocuda': CUDA shared memory needs a CUDA device: "
            in err.value.message())
    with pytest.raises(InferenceServerException) as err:
        grpc_client.register_cuda_shared_memory("nocuda", handle, 0, 64)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "CUDA shared memory needs a CUDA device" in err.value.message()
    assert client.get_cuda_shared_memory_status() == []
    assert len(grpc_client.get_cuda_shared_memory_status().regions) == 0
    client.unregister_cuda_shared_memory("nocuda")  # unknown names: no error, as in Triton
    client.unregister_cuda_shared_memory()
    grpc_client.unregister_cuda_shared_memory("nocuda")
    with pytest.raises(InferenceServerException) as err:
        client.get_cuda_shared_memory_status("nocuda")
    assert err.value.status() == "404" and "CUDA shared memory region 'nocuda' is not registered" in err.value.message()


def test_cuda_register_arguments_are_checked_first(client, grpc_client):
    with pytest.raises(InferenceServerException) as err:
        client.register_cuda_shared_memory("bad", base64.b64encode(bytes(10)), 0, 64)
    assert err.value.status() == "400" and "64 bytes of a cudaIpcMemHandle_t, got 10 bytes" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.register_cuda_shared_memory("bad", b"not base64!", 0, 64)
    assert err.value.status() == "400" and "raw_handle: invalid base64" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        grpc_client.register_cuda_shared_memory("bad", base64.b64encode(bytes(64)), -1, 64)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "device_id must be >= 0" in err.value.message()


def test_system_and_cuda_regions_share_one_name_space(client):
    key = f"/modelyard_test_{uuid.uuid4().hex[:12]}"
    handle = system_shm.create_shared_memory_region(key.strip("/"), key, 64)
    client.register_system_shared_memory("both", key, 64)
    try:
        with pytest.raises(InferenceServerException) as err:
            client.register_cuda_shared_memory("both", base64.b64encode(bytes(64)), 0, 64)
        assert err.value.status() == "409" and "as system shared memory" in err.value.message()
        with pytest.raises(InferenceServerException) as err:
            client.get_cuda_shared_memory_status("both")
        assert err.value.status() == "404"
        assert "registered as system shared memory, not CUDA shared memory" in err.value.message()
        client.unregister_cuda_shared_memory()  # CUDA regions only
        assert [r["name"] for r in client.get_system_shared_memory_status()] == ["both"]
    finally:
        client.unregister_system_shared_memory()
        system_shm.destroy_shared_memory_region(handle)
