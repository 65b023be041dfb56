"""Opt-in response cache per model version: an LRU bounded by entries and bytes.

The key is a SHA-256 over the model, version, every input (name, datatype,
shape, bytes), the requested outputs and the parameters that can change the
answer; scheduling-only parameters (priority, timeout) are left out so the same
question asked with a different deadline still hits. Only successful responses
are stored: an error is never replayed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from modelyard.server.model_config import ResponseCache as CacheConfig
from modelyard.server.types import InferRequest, InferResponse

#: request parameters that steer scheduling, not the result
_IGNORED_PARAMS = frozenset({"priority", "timeout"})


def _feed_array(h: hashlib._Hash, arr: np.ndarray) -> None:
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    if arr.dtype == object:
        # BYTES: each element length-prefixed, so ["ab","c"] and ["a","bc"] differ
        for x in arr.reshape(-1):
            b = x if isinstance(x, bytes) else str(x).encode()
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    else:
        h.update(np.ascontiguousarray(arr).data)


def request_key(request: InferRequest, model: str, version: str) -> str:
    """The cache key of a request (hex SHA-256)."""
    h = hashlib.sha256()
    h.update(f"{model}\x00{version}\x00".encode())
    for name in sorted(request.inputs):
        h.update(name.encode() + b"\x00")
        _feed_array(h, np.asarray(request.inputs[name]))
    outputs = sorted(request.outputs) if request.outputs is not None else None
    params = {k: v for k, v in request.parameters.items() if k not in _IGNORED_PARAMS}
    extra = {"outputs": outputs, "params": params, "out_params": request.output_parameters}
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def response_bytes(response: InferResponse) -> int:
    """Approximate memory held by a response's outputs."""
    total = 0
    for arr in response.outputs.values():
        a = np.asarray(arr)
        total += sum(len(x) if isinstance(x, bytes | str) else 8 for x in a.reshape(-1)) if a.dtype == object else a.nbytes
    return total


@dataclass(slots=True)
class _Entry:
    response: InferResponse
    size: int


class ResponseCache:
    """LRU of responses; thread-safe so warmup or worker threads may touch it too."""

    def __init__(self, config: CacheConfig) -> None:
        self.max_entries = config.max_entries
        self.max_bytes = config.max_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes

    def get(self, key: str) -> InferResponse | None:
        """A copy of the cached response (outputs shared read-only), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            cached = entry.response
        return InferResponse(outputs=dict(cached.outputs), parameters=dict(cached.parameters), final=True)

    def put(self, key: str, response: InferResponse) -> bool:
        """Store a successful response; False when it alone is larger than ``max_bytes``."""
        if isinstance(response, BaseException):  # defensive: errors are never cached
            return False
        outputs = {}
        for name, arr in response.outputs.items():
            a = np.array(arr, copy=True)
            a.flags.writeable = False  # a hit hands the same arrays to many clients
            outputs[name] = a
        stored = InferResponse(outputs=outputs, parameters=dict(response.parameters))
        size = response_bytes(stored)
        if size > self.max_bytes:
            return False
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.size
            self._entries[key] = _Entry(stored, size)
            self._bytes += size
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.size
        return True


#: inputs (or outputs) larger than this are hashed / copied for the cache in a worker thread
INLINE_HASH_BYTES = 64 * 1024


class CachedInfer:
    """``infer`` through the response cache: a hit is answered here, a miss goes to ``compute`` and is stored.

    ``on_lookup(hit, ns)`` is told of every lookup (metrics and statistics).
    """

    __slots__ = ("cache", "compute", "model", "on_lookup", "version")

    def __init__(self, cache: ResponseCache, compute: Callable[[InferRequest], Awaitable[InferResponse]],
                 model: str, version: str, on_lookup: Callable[[bool, int], None]) -> None:
        self.cache = cache
        self.compute = compute
        self.model = model
        self.version = version
        self.on_lookup = on_lookup

    async def infer(self, request: InferRequest) -> InferResponse:
        t0 = time.perf_counter_ns()
        big = sum(a.nbytes for a in request.inputs.values()) > INLINE_HASH_BYTES
        loop = asyncio.get_running_loop()
        # hashing megabytes is compute: small requests hash inline (cheaper than a thread hop)
        key = (await loop.run_in_executor(None, request_key, request, self.model, self.version) if big
               else request_key(request, self.model, self.version))
        hit = self.cache.get(key)
        self.on_lookup(hit is not None, time.perf_counter_ns() - t0)
        if hit is not None:
            return hit
        # errors propagate before put: they are never cached
        response = await self.compute(request)
        if big or sum(getattr(a, "nbytes", 0) for a in response.outputs.values()) > INLINE_HASH_BYTES:
            await loop.run_in_executor(None, self.cache.put, key, response)
        else:
            self.cache.put(key, response)
        return response
