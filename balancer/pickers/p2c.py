"""Power of d choices: draw d distinct endpoints (two by default), keep the cheapest."""

from __future__ import annotations

import random
from collections.abc import Callable

from modelyard.balancer.endpoint import Endpoint, Entry


def pick_two(eps: tuple[Entry, ...], rng: random.Random, cost: Callable[[Entry], float]) -> Endpoint:
    """P2C over ``eps`` with ``cost`` (lower wins); ties go to the first draw."""
    n = len(eps)
    if n == 1:
        return eps[0].endpoint
    i = rng.randrange(n)
    j = rng.randrange(n - 1)
    if j >= i:
        j += 1
    a, b = eps[i], eps[j]
    return b.endpoint if cost(b) < cost(a) else a.endpoint


def pick_best(eps: tuple[Entry, ...], rng: random.Random, cost: Callable[[Entry], float], d: int) -> Endpoint:
    """The cheapest of ``d`` distinct endpoints drawn at random (all of them when there are no more than
    ``d``, scanned from a random start so that ties spread); ``d`` = 2 is :func:`pick_two`."""
    n = len(eps)
    if d <= 2 or n == 1:
        return pick_two(eps, rng, cost)
    drawn = range(n) if n <= d else rng.sample(range(n), d)
    start = rng.randrange(n) if n <= d else 0
    best = eps[drawn[start]] if n <= d else eps[drawn[0]]
    best_cost = cost(best)
    for k in range(1, len(drawn)):
        e = eps[drawn[(start + k) % n]] if n <= d else eps[drawn[k]]
        c = cost(e)
        if c < best_cost:
            best, best_cost = e, c
    return best.endpoint
