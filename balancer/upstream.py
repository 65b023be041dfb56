"""Connection pooling to one upstream endpoint: a few HTTP/2 channels, raw-bytes call objects."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from modelyard.balancer.routing import MAX_CACHED_METHODS


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Options for upstream channels: own connection per channel, quick reconnects, big messages."""
    return [
        # without this, channels to one address share a subchannel (one TCP connection)
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.enable_retries", 0),
        ("grpc.keepalive_time_ms", 30000),
        ("grpc.http2.max_pings_without_data", 0),
    ]


class Upstream:
    """``channels`` channels to one address; multicallables are cached per method and rotated."""

    __slots__ = ("_i", "_stream", "_unary", "address", "channels", "ready")

    def __init__(self, address: str, channels: int, max_message_bytes: int) -> None:
        self.address = address
        opts = channel_options(max_message_bytes)
        self.channels = [grpc.aio.insecure_channel(address, options=opts) for _ in range(channels)]
        self._unary: dict[str, list[Callable[..., Any]]] = {}
        self._stream: dict[str, list[Callable[..., Any]]] = {}
        self._i = 0
        #: a channel was READY at the last check; the proxy then skips the per-call state check
        #: until an attempt fails (checking every channel's state per call costs ~1% of a core)
        self.ready = False

    def unary(self, method: str) -> Callable[..., Any]:
        """A unary-unary callable taking and returning bytes, on the next channel."""
        mcs = self._unary.get(method)
        if mcs is None:
            # _registered_method avoids grpc's per-call method-name lookup where supported
            mcs = [ch.unary_unary(method) for ch in self.channels]
            if len(self._unary) < MAX_CACHED_METHODS:
                self._unary[method] = mcs
        self._i += 1
        return mcs[self._i % len(mcs)]

    def stream(self, method: str) -> Callable[..., Any]:
        """A stream-stream callable (any call kind is wire-compatible with it)."""
        mcs = self._stream.get(method)
        if mcs is None:
            mcs = [ch.stream_stream(method) for ch in self.channels]
            if len(self._stream) < MAX_CACHED_METHODS:
                self._stream[method] = mcs
        self._i += 1
        return mcs[self._i % len(mcs)]

    def connecting(self) -> bool:
        """True when no channel is READY yet (requests sent now wait for a connection)."""
        ready = any(ch.get_state(False) is grpc.ChannelConnectivity.READY for ch in self.channels)
        self.ready = ready
        return not ready

    async def close(self, grace: float | None = None) -> None:
        for ch in self.channels:
            await ch.close(grace)
