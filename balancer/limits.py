"""Limits of the client-facing HTTP/2 server against hostile or broken clients (``limits:`` in the config).

Every limit is per data-plane process (each ``--workers`` process has its own). What each one
defends against, and what a client sees when it is reached, is in docs/balancer.md ("Limits against
hostile clients"); the defaults are safe for the open internet and far above what a gRPC client
needs.
"""

from __future__ import annotations

from dataclasses import dataclass

from modelyard.config import Check

__all__ = ["DEFAULT_LIMITS", "LimitsConfig"]

MAX_WINDOW = (1 << 31) - 1


@dataclass
class LimitsConfig:
    """Limits of the client-facing HTTP/2 server (per worker process)."""

    #: client connections open at once; a connection over it gets GOAWAY ENHANCE_YOUR_CALM and is closed
    max_connections: int = 4096
    #: streams one connection may have open (SETTINGS_MAX_CONCURRENT_STREAMS); more are refused (REFUSED_STREAM);
    #: gRPC clients queue calls beyond it (nghttp2's default, and Envoy's advice for untrusted clients)
    max_concurrent_streams: int = 100
    #: early resets (streams the client reset within ``reset_min_age`` s of opening them, streams refused
    #: or reset for its errors): the connection gets GOAWAY ENHANCE_YOUR_CALM once they number at least
    #: ``reset_limit`` and at least ``reset_ratio`` of the streams it opened (Envoy's premature-reset rule)
    reset_limit: int = 250
    reset_ratio: float = 0.5
    reset_min_age: float = 1.0
    #: control frames (PING and SETTINGS ACKs, RST_STREAM) queued for a client that is not reading them;
    #: over it GOAWAY ENHANCE_YOUR_CALM (Envoy's max_outbound_control_frames)
    max_control_frames: int = 1000
    #: a request's header list (RFC 7541 size: name + value + 32 per field; SETTINGS_MAX_HEADER_LIST_SIZE),
    #: also the most bytes of one header block on the wire
    max_header_list_bytes: int = 65536
    #: CONTINUATION frames after one HEADERS frame (nghttp2's limit)
    max_continuation_frames: int = 8
    #: consecutive DATA/HEADERS/CONTINUATION frames with an empty payload (and no END_STREAM)
    max_empty_frames: int = 1
    #: each connection's HPACK caches (decoded header blocks, Huffman strings)
    connection_header_cache_bytes: int = 64 * 1024
    #: each process-wide header cache (parsed request heads, encoded fields, encoded blocks)
    header_cache_bytes: int = 4 << 20
    #: a request stream's receive window (SETTINGS_INITIAL_WINDOW_SIZE): the most bytes of one stream
    #: the balancer holds that are not yet written upstream
    stream_buffer_bytes: int = 1 << 20
    #: a connection's receive window: the most request bytes of one connection not yet written upstream,
    #: and separately the most kept for retries (beyond it a unary call is sent once, not retried)
    connection_buffer_bytes: int = 16 << 20
    #: seconds a new connection has to send the HTTP/2 preface and its SETTINGS, and to acknowledge ours
    preface_timeout: float = 10.0
    #: a connection without an open stream for this many seconds gets GOAWAY NO_ERROR and is closed
    #: (detected within 1-2x this time); 0 disables
    idle_timeout: float = 300.0
    #: frames of one connection processed in a row before other connections get a turn (fairness)
    frames_per_read: int = 128
    #: every this many seconds, freed memory goes back to the OS if RSS grew by 32 MiB (glibc's
    #: malloc_trim; after a flood of big requests RSS would otherwise stay at its peak); 0 disables
    heap_trim_interval: float = 5.0

    def validate(self, check: Check) -> None:
        for k in ("max_connections", "max_concurrent_streams", "reset_limit", "max_control_frames",
                  "frames_per_read"):
            check(getattr(self, k) >= 1, k, "must be >= 1")
        check(0 < self.reset_ratio <= 1, "reset_ratio", "must be within (0, 1]")
        check(self.reset_min_age >= 0, "reset_min_age", "must be >= 0")
        check(self.max_header_list_bytes >= 4096, "max_header_list_bytes", "must be >= 4096")
        check(self.max_continuation_frames >= 0, "max_continuation_frames", "must be >= 0")
        check(self.max_empty_frames >= 0, "max_empty_frames", "must be >= 0")
        check(self.connection_header_cache_bytes >= 0, "connection_header_cache_bytes", "must be >= 0")
        check(self.header_cache_bytes >= 0, "header_cache_bytes", "must be >= 0")
        check(65535 <= self.stream_buffer_bytes <= MAX_WINDOW, "stream_buffer_bytes",
              f"must be within 65535..{MAX_WINDOW} (an HTTP/2 window)")
        check(65535 <= self.connection_buffer_bytes <= MAX_WINDOW, "connection_buffer_bytes",
              f"must be within 65535..{MAX_WINDOW} (an HTTP/2 window)")
        check(self.preface_timeout > 0, "preface_timeout", "must be > 0")
        check(self.idle_timeout >= 0, "idle_timeout", "must be >= 0 (0 disables)")
        check(self.heap_trim_interval >= 0, "heap_trim_interval", "must be >= 0 (0 disables)")


DEFAULT_LIMITS = LimitsConfig()
