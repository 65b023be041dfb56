"""Per-client token buckets, bounded in memory.

Each client (a token's name, else a peer address) has a bucket of ``burst`` tokens refilled at
``rps`` per second; a request takes one. :meth:`TokenBuckets.take` answers 0 when the request may
go, else the seconds until the client's next token (the retry-after hint). At most
``max_clients`` buckets are kept: the least recently seen client is forgotten first (it comes back
with a full bucket), so a flood of distinct addresses costs bounded memory.

Not thread-safe: one event loop owns it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class TokenBuckets:
    def __init__(self, rps: float, burst: float, max_clients: int = 10000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rps < 0 or burst < 1 or max_clients < 1:
            raise ValueError("rps must be >= 0, burst >= 1 and max_clients >= 1")
        self.rps = rps
        self.burst = burst
        self.max_clients = max_clients
        self.clock = clock
        #: client -> [tokens, last refill time]
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()
        self.limited = 0

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, client: str, rps: float | None = None, burst: float | None = None) -> float:
        """Take one token of ``client``'s bucket: 0.0 when allowed, else seconds until a token is there.

        ``rps``/``burst`` override the defaults for this client (a token's own limit); ``rps`` 0
        means no limit.
        """
        rate = self.rps if rps is None else rps
        if rate <= 0:
            return 0.0
        size = self.burst if burst is None else burst
        now = self.clock()
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= self.max_clients:
                self._buckets.popitem(last=False)
            bucket = self._buckets[client] = [size, now]
        else:
            self._buckets.move_to_end(client)
            bucket[0] = min(size, bucket[0] + (now - bucket[1]) * rate)
            bucket[1] = now
        if bucket[0] >= 1.0 - 1e-9:  # float refills land a hair short of a whole token
            bucket[0] = max(0.0, bucket[0] - 1.0)
            return 0.0
        self.limited += 1
        return (1.0 - bucket[0]) / rate
