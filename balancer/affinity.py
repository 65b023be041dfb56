"""Sequence affinity: every request of one Triton sequence goes to the same replica.

A sequence's state (its slot in the sequence batcher, the model's own per-sequence state) lives in the
replica that got its START, so the requests with the same (model, ``sequence_id``) must all reach that
replica. The choice is rendezvous (highest-random-weight) hashing of that key over the pool's routable
endpoints: each endpoint scores ``hash(key, address)`` and the best score wins. It is pure and keeps no
table, so every worker process and both listeners (gRPC and REST) choose the same replica for a key
while they see the same endpoints; an endpoint that leaves moves only its own keys (each to its
runner-up), and one that joins takes ~1/(N+1) of the keys, from every other endpoint alike.

Weights: the endpoint's configured weight, never the slow-start ramp (a ramp would move keys while it
runs); score = ``weight / -ln(u)``, ``u`` the hash mapped into (0, 1) (Schindelhauer and Schomaker's
logarithmic method), which gives each endpoint its weight's share of the keys; with equal weights that is
the plain highest hash, compared as integers. Hashes: BLAKE2b of the key and of each address (not
Python's ``hash``, which differs per process), combined by splitmix64's finalizer -- ~1 µs per endpoint.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from hashlib import blake2b
from typing import TypeVar

from modelyard.balancer.endpoint import Endpoint, NoEndpoint, Snapshot

T = TypeVar("T")

_MASK = (1 << 64) - 1
#: u = (53 high bits of the hash + 0.5) / 2**53: never 0 or 1, so -ln(u) is finite and positive
_SCALE = 2.0 ** -53
#: address -> its 64-bit hash; addresses come from discovery (bounded by the pools), cleared when over this
_NAME_HASHES: dict[str, int] = {}
_MAX_NAME_HASHES = 4096


def sequence_key(model: str | None, sequence_id: int | str) -> bytes:
    """The affinity key of a request of a sequence: its model and correlation ID (1 and "1" are two
    different sequences, as for the server)."""
    kind = b"i" if isinstance(sequence_id, int) else b"s"
    return b"%s\x00%s%s" % ((model or "").encode(), kind, str(sequence_id).encode())


def _hash64(data: bytes) -> int:
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "big")


def _name_hash(name: str) -> int:
    h = _NAME_HASHES.get(name)
    if h is None:
        if len(_NAME_HASHES) >= _MAX_NAME_HASHES:
            _NAME_HASHES.clear()
        h = _NAME_HASHES[name] = _hash64(name.encode())
    return h


def _mix(x: int) -> int:
    """splitmix64's finalizer: every bit of the key's and the name's hash moves every bit of the score."""
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _MASK
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def rendezvous(key: bytes, candidates: Iterable[tuple[T, str, float]], weighted: bool = True) -> T | None:
    """The candidate ``(item, name, weight)`` with the highest score for ``key``; None when there is none.
    ``weighted=False``: every weight is the same (the highest hash wins, no logarithm needed)."""
    kh = _hash64(key)
    best: T | None = None
    best_score: float = -1.0
    for item, name, weight in candidates:
        x = _mix(kh ^ _name_hash(name))
        score: float = x if not weighted else \
            (weight if weight > 0 else 1e-12) / -math.log(((x >> 11) + 0.5) * _SCALE)
        if score > best_score:
            best, best_score = item, score
    return best


def pick_by_key(snapshot: Snapshot, key: bytes) -> Endpoint:
    """The endpoint of ``snapshot`` that owns ``key`` (raises :class:`NoEndpoint` on an empty snapshot)."""
    entries = snapshot.entries
    w0 = entries[0].endpoint.weight if entries else 1.0
    ep = rendezvous(key, ((e.endpoint, e.endpoint.address, e.endpoint.weight) for e in entries),
                    weighted=any(e.endpoint.weight != w0 for e in entries))
    if ep is None:
        raise NoEndpoint(snapshot.pool)
    return ep


def choose_by_key(key: bytes, names: Sequence[str], weights: Sequence[float]) -> str:
    """One of ``names`` (weighted), the same for ``key`` every time: a weighted split of pools (a canary)
    keeps each sequence on one side."""
    best = rendezvous(key, ((n, n, w) for n, w in zip(names, weights, strict=True)))
    assert best is not None, "a split has at least one pool"
    return best
