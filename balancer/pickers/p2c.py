"""Power of two choices: draw two distinct endpoints, keep the cheaper one."""

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
