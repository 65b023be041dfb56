"""What the latency-aware pickers share: a load estimator per endpoint, P2C on its cost, the failure penalty."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from modelyard.balancer.endpoint import Endpoint, Entry, Outcome, Snapshot
from modelyard.balancer.pickers.base import BasePicker
from modelyard.balancer.pickers.p2c import pick_best


class LatencyPicker(BasePicker):
    """P2C on ``load.cost(now, outstanding) / weight``; subclasses say what the load is (:meth:`new_load`)
    and how an answer updates it (:meth:`learn`).

    ``tau``: how fast the past is forgotten (s); ``rtt_prior``: a new endpoint's latency (s);
    ``failure_penalty``: the latency a failed attempt counts as (s), so that a fast-failing endpoint
    looks slow, not fast.
    """

    #: endpoints compared per pick (power of d choices)
    choices = 2

    def __init__(self, tau: float = 10.0, rtt_prior: float = 0.005, failure_penalty: float = 0.5,
                 choices: int | None = None, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        if tau <= 0 or rtt_prior <= 0 or failure_penalty < 0:
            raise ValueError("tau and rtt_prior must be > 0, failure_penalty >= 0")
        if choices is not None:
            if choices < 2:
                raise ValueError("choices must be >= 2")
            self.choices = choices
        self.tau, self.rtt_prior, self.failure_penalty = tau, rtt_prior, failure_penalty

    #: the class of the per-endpoint estimator (an endpoint's ``load`` of another class is replaced)
    load_type: type = object

    def new_load(self, now: float) -> Any:
        raise NotImplementedError

    def learn(self, load: Any, now: float, inflight: int, latency: float) -> None:
        raise NotImplementedError

    def load_of(self, e: Endpoint) -> Any:
        load = e.load
        if not isinstance(load, self.load_type):
            load = e.load = self.new_load(self.clock.now())
        return load

    def pick(self, snapshot: Snapshot, exclude: Collection[Endpoint] = ()) -> Endpoint:
        now = self.clock.now()
        load_of = self.load_of

        def cost(e: Entry) -> float:
            w = e.weight
            ep = e.endpoint
            return load_of(ep).cost(now, ep.outstanding) / w if w > 0 else float("inf")

        return pick_best(self.candidates(snapshot, exclude), self.rng, cost, self.choices)

    def on_done(self, endpoint: Endpoint, outcome: Outcome, latency: float, inflight: int = 0) -> None:
        if outcome is Outcome.FAILURE and latency < self.failure_penalty:
            latency = self.failure_penalty
        self.learn(self.load_of(endpoint), self.clock.now(), inflight, latency)
