"""The scaling decision: Knative's KPA and the Kubernetes HPA, then an SLO mode -- pure.

:meth:`Policy.decide` looks at a window of :class:`Sample` s (one per tick, gathered by the
daemon) and the time ``now`` it is given; it does no I/O and reads no clock. It remembers only its
own past decisions (panic mode, the scale-down delay window, the last time traffic was seen), so a
sequence of calls with explicit times is fully deterministic -- that is how the tests drive it.

Per tick, in order:

1. **Observed load** per the ``mode``: ``concurrency`` (requests in flight, the default), ``rps``
   or ``queue`` (requests waiting in the replicas' scheduler queues), averaged over the stable
   window (``stable_window``, 60 s) and over the panic window (``panic_window``, 6 s).
2. **Desired replicas** = ``ceil(observed / (target * target_utilization))`` for each window. In
   ``slo`` mode the target comes from the measured service time instead (see :func:`slo_replicas`).
3. **Panic** (KPA): when the panic-window desire is ``>= panic_threshold`` x the ready replicas,
   the policy follows the panic window and never scales down, until the panic condition has been
   absent for a whole stable window.
4. **Tolerance** (HPA): outside panic, a load within ``tolerance`` of what the current replicas are
   sized for keeps the current scale.
5. **Rate limits** (KPA): at most ``max_scale_up_rate`` x ready replicas up, at least
   ready / ``max_scale_down_rate`` down, per tick.
6. **Scale-down delay** (KPA): the highest desire of the last ``scale_down_delay`` seconds wins.
7. **Bounds**: ``min_replicas`` .. ``max_replicas``; 0 only with ``scale_to_zero`` after
   ``scale_to_zero_grace`` seconds without any traffic. Requests held by the balancer for a pool
   with no replica (``held``) always ask for at least one (activation).

No data in the stable window (every metrics source down) holds the current scale and says so.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from modelyard.config import Check

Mode = Literal["concurrency", "rps", "queue", "slo"]
#: ln(100): for exponential sojourn times, p99 = ln(100) x the mean
LN100 = math.log(100.0)


@dataclass
class PolicyConfig:
    """Every knob of the scaling policy (Knative names where Knative has one), with its default."""

    #: what is scaled on: concurrency (in flight), rps, queue (queue length), or slo (p99 target)
    mode: Mode = "concurrency"
    #: per-replica target of the metric (in-flight requests, requests/s, or queued requests)
    target: float = 10.0
    #: share of ``target`` to aim for, leaving headroom for bursts (KPA target-utilization: 70%)
    target_utilization: float = 0.7
    #: seconds averaged for the normal decision
    stable_window: float = 60.0
    #: seconds averaged to detect bursts
    panic_window: float = 6.0
    #: panic when the panic-window desire is at least this many times the ready replicas
    panic_threshold: float = 2.0
    #: relative band around the target within which the scale is left alone (HPA: 0.1)
    tolerance: float = 0.1
    #: per tick, scale up to at most this many times the ready replicas
    max_scale_up_rate: float = 1000.0
    #: per tick, scale down to no fewer than ready replicas divided by this
    max_scale_down_rate: float = 2.0
    #: seconds a higher desire is kept before scaling down
    scale_down_delay: float = 0.0
    min_replicas: int = 1
    max_replicas: int = 10
    #: allow 0 replicas (with min_replicas: 0) after ``scale_to_zero_grace`` s without traffic
    scale_to_zero: bool = False
    scale_to_zero_grace: float = 30.0
    #: slo mode: the p99 latency (ms) to keep the pool under with the fewest replicas
    slo_p99_ms: float = 100.0
    #: slo mode: never plan a replica busier than this share of its time
    slo_max_utilization: float = 0.9
    #: slo mode: scale down only while the measured p99 is below this share of the target (hysteresis)
    slo_scale_down_headroom: float = 0.7

    def validate(self, check: Check) -> None:
        check(self.target > 0, "target", f"must be > 0, got {self.target}")
        check(0 < self.target_utilization <= 1, "target_utilization", "must be within (0, 1]")
        check(self.stable_window > 0, "stable_window", "must be > 0")
        check(0 < self.panic_window <= self.stable_window, "panic_window", "must be within (0, stable_window]")
        check(self.panic_threshold > 1, "panic_threshold", "must be > 1")
        check(0 <= self.tolerance < 1, "tolerance", "must be within [0, 1)")
        check(self.max_scale_up_rate > 1, "max_scale_up_rate", "must be > 1")
        check(self.max_scale_down_rate > 1, "max_scale_down_rate", "must be > 1")
        check(self.scale_down_delay >= 0, "scale_down_delay", "must be >= 0")
        check(self.min_replicas >= 0, "min_replicas", "must be >= 0")
        check(self.min_replicas > 0 or self.scale_to_zero, "min_replicas",
              "may be 0 only with scale_to_zero: true")
        check(self.max_replicas >= max(1, self.min_replicas), "max_replicas", "must be >= min_replicas and >= 1")
        check(self.scale_to_zero_grace >= 0, "scale_to_zero_grace", "must be >= 0")
        check(self.slo_p99_ms > 0, "slo_p99_ms", "must be > 0")
        check(0 < self.slo_max_utilization < 1, "slo_max_utilization", "must be within (0, 1)")
        check(0 < self.slo_scale_down_headroom <= 1, "slo_scale_down_headroom", "must be within (0, 1]")


@dataclass(frozen=True, slots=True)
class Sample:
    """One tick's view of a pool. Load fields are pool totals; None = not measured this tick
    (a source that did not answer is missing data, never a zero)."""

    time: float
    #: replicas asked for (the actuator's current scale) and replicas serving
    replicas: int
    ready: int
    concurrency: float | None = None
    rps: float | None = None
    queue: float | None = None
    p99_ms: float | None = None
    #: mean busy time of a replica's model instances per request (s), and instances per replica (slo mode)
    service_s: float | None = None
    instances: int = 1
    #: requests the balancer holds because the pool has no replica (activation)
    held: int = 0


@dataclass(frozen=True, slots=True)
class Decision:
    """What the policy wants, and why: ``kind`` is a short label (metrics), ``reason`` the sentence (logs)."""

    desired: int
    reason: str
    panic: bool
    kind: str = "hold"
    #: the observed load (stable window) the decision is based on, in the mode's unit
    observed: float | None = None


def _mean(values: Sequence[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return sum(got) / len(got) if got else None


def slo_replicas(rps: float, service_s: float, instances: int, p99_target_s: float,
                 max_utilization: float, calibration: float = 1.0) -> tuple[int, float, bool]:
    """Fewest replicas that keep the p99 under ``p99_target_s`` at ``rps``: ``(replicas, utilization, reachable)``.

    The offered work is ``rps x service_s`` busy-seconds per second (the utilization law,
    Little's law applied to the busy instances); a replica has ``instances`` of capacity. For a
    queue with exponential service, p99 of the time in system is ``ln(100) x S / (1 - rho)``, so the
    target allows a utilization of at most ``1 - ln(100) x S / T``. Real servers are not M/M/1
    (batching, steadier service times, proxy hops): ``calibration`` is measured p99 over that
    prediction (see :class:`Policy`), and scales the queueing term. ``reachable`` is False when the
    service time alone breaks the target (then the utilization floor of 5% is planned).
    """
    allowed = 1.0 - calibration * LN100 * service_s / p99_target_s
    reachable = allowed > 0.05
    rho = min(max(allowed, 0.05), max_utilization)
    work = rps * service_s
    return max(0, math.ceil(work / (instances * rho) - 1e-9)), rho, reachable


@dataclass(frozen=True, slots=True)
class Desire:
    """Replicas wanted for a window's load: ``want`` (what is asked), ``exact`` (unrounded, for the panic
    and tolerance tests), ``how`` (the sentence); ``forced`` when measured latency overrode the sizing."""

    want: int
    exact: float
    how: str
    forced: bool = False


class Policy:
    """KPA/HPA-style decisions for one pool; deterministic given the samples and times it is shown."""

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self.panic = False
        self._panic_since = -math.inf
        self._max_panic = 0
        self._last_traffic = -math.inf
        #: slo mode: measured p99 over the M/M/1 prediction at the measured utilization, smoothed
        self._slo_calibration = 1.0
        #: (time, desire) of recent decisions, for the scale-down delay
        self._recent: deque[tuple[float, int]] = deque()

    # ------------------------------------------------------------------ helpers

    def _per_replica(self) -> float:
        c = self.config
        return c.target * c.target_utilization

    def _observed(self, window: Sequence[Sample]) -> float | None:
        mode = self.config.mode
        if mode == "queue":
            return _mean([s.queue for s in window])
        if mode == "rps" or mode == "slo":
            return _mean([s.rps for s in window])
        # concurrency: what is held at the balancer is in flight too (it waits for a replica)
        return _mean([None if s.concurrency is None else s.concurrency + s.held for s in window])

    def _desire(self, window: Sequence[Sample], observed: float | None, ready: int) -> Desire | None:
        """Replicas wanted for ``observed``: rounded, unrounded, and how it was sized."""
        c = self.config
        if observed is None:
            return None
        if c.mode == "slo":
            service = _mean([s.service_s for s in window])
            instances = max(1, window[-1].instances)
            p99 = _mean([s.p99_ms for s in window])
            if service is None or service <= 0:
                # no utilization data yet: size on concurrency (Little's law: L = rps x latency)
                conc = _mean([s.concurrency for s in window])
                if conc is None:
                    return None
                exact = conc / self._per_replica()
                return Desire(math.ceil(exact - 1e-9), exact, f"slo: no service time measured yet, concurrency "
                              f"{conc:.1f} sized at {self._per_replica():g}/replica")
            n, rho, reachable = slo_replicas(observed, service, instances, c.slo_p99_ms / 1e3, c.slo_max_utilization,
                                             self._slo_calibration)
            exact = observed * service / (instances * rho)
            text = (f"slo: {observed:.1f} req/s x {service * 1e3:.1f} ms service time over {instances} instance(s) "
                    f"at <= {rho:.0%} busy for p99 < {c.slo_p99_ms:g} ms (queueing x{self._slo_calibration:.2f})")
            if not reachable:
                text += " (unreachable: the service time alone exceeds it)"
            if p99 is not None and p99 > c.slo_p99_ms and n <= ready:
                # the queueing model is approximate (batching, bursts): measured latency overrides it
                return Desire(ready + 1, exact, text + f"; measured p99 {p99:.1f} ms is over target: one more", True)
            if n < ready and (p99 is None or p99 > c.slo_p99_ms * c.slo_scale_down_headroom):
                # fewer replicas only with measured headroom, or the model and the pool take turns
                return Desire(ready, exact, text + f"; holding {ready}: measured p99 "
                              f"{'unknown' if p99 is None else f'{p99:.1f} ms'} is not below "
                              f"{c.slo_scale_down_headroom:.0%} of the target", True)
            return Desire(n, exact, text)
        per = self._per_replica()
        unit = {"concurrency": "in flight", "rps": "req/s", "queue": "queued"}[c.mode]
        exact = observed / per
        return Desire(math.ceil(exact - 1e-9), exact, f"{c.mode} {observed:.1f} {unit} at {per:g}/replica")

    def _calibrate(self, sample: Sample) -> None:
        """slo mode: learn how far the queueing model is from this pool's measured p99 (one sample per tick)."""
        if sample.rps is None or sample.service_s is None or sample.p99_ms is None or sample.ready < 1:
            return
        rho = sample.rps * sample.service_s / (sample.ready * max(1, sample.instances))
        if not 0.05 <= rho < 0.95 or sample.service_s <= 0:
            return  # nearly idle or saturated: the ratio says nothing
        predicted_ms = LN100 * sample.service_s / (1.0 - rho) * 1e3
        observed = min(max(sample.p99_ms / predicted_ms, 0.1), 5.0)
        self._slo_calibration += 0.2 * (observed - self._slo_calibration)

    # ------------------------------------------------------------------ the decision

    def decide(self, samples: Sequence[Sample], now: float) -> Decision:
        """The replica count the pool should have at ``now``, given the samples up to ``now``."""
        if not samples:
            raise ValueError("decide needs at least the current sample (replicas, ready)")
        c = self.config
        last = samples[-1]
        current = last.replicas
        ready = max(1, last.ready)
        stable = [s for s in samples if s.time > now - c.stable_window]
        panic_w = [s for s in stable if s.time > now - c.panic_window]
        if any((s.rps or 0) > 0 or (s.concurrency or 0) > 0 or s.held > 0 or (s.queue or 0) > 0 for s in panic_w):
            self._last_traffic = now
        held = last.held
        if c.mode == "slo":
            self._calibrate(last)
        obs_stable = self._observed(stable)
        if obs_stable is None:
            if held and current == 0:
                return self._finish(now, 1, "activation: requests are held and no metrics yet", "activation", None,
                                    current)
            return Decision(current, f"no metrics in the last {c.stable_window:g}s: holding {current} replica(s)",
                            self.panic, "no_data", None)
        des_stable = self._desire(stable, obs_stable, ready)
        if des_stable is None:
            return Decision(current, f"no usable metrics in the last {c.stable_window:g}s: holding {current} "
                            "replica(s)", self.panic, "no_data", obs_stable)
        des_panic = self._desire(panic_w, self._observed(panic_w), ready) if panic_w else None

        # panic mode (KPA): bursts are followed at once and never answered with a scale-down; the
        # threshold compares the unrounded desire (KPA's observed panic value / target)
        if des_panic is not None and des_panic.exact / ready >= c.panic_threshold:
            if not self.panic:
                self._max_panic = current
            self.panic = True
            self._panic_since = now
        elif self.panic and now - self._panic_since >= c.stable_window:
            self.panic = False
            self._max_panic = 0

        if self.panic:
            want = max(des_panic.want if des_panic is not None else des_stable.want, current, self._max_panic)
            self._max_panic = want
            kind = "panic"
            text = f"panic: {(des_panic or des_stable).how} over {c.panic_window:g}s"
        else:
            want, kind, text = des_stable.want, "", f"{des_stable.how} over {c.stable_window:g}s"
            if current > 0 and not des_stable.forced and abs(des_stable.exact / current - 1.0) <= c.tolerance:
                want, kind = current, "tolerance"
                text += f" is within {c.tolerance:.0%} of {current} replica(s)"

        # rate limits (relative to ready replicas, at least one)
        up_limit = math.ceil(c.max_scale_up_rate * ready)
        down_limit = math.floor(ready / c.max_scale_down_rate)
        if want > up_limit:
            want, kind = up_limit, kind or "rate_limited"
            text += f"; max scale-up rate allows {up_limit}"
        elif want < down_limit and want < current:
            want, kind = down_limit, kind or "rate_limited"
            text += f"; max scale-down rate allows {down_limit}"
        return self._finish(now, want, text, kind, obs_stable, current, held)

    def _finish(self, now: float, want: int, text: str, kind: str, observed: float | None, current: int,
                held: int = 0) -> Decision:
        c = self.config
        # scale-down delay: the highest recent desire holds for scale_down_delay seconds
        self._recent.append((now, want))
        while self._recent and self._recent[0][0] <= now - c.scale_down_delay:
            self._recent.popleft()
        delayed = max((d for _, d in self._recent), default=want)
        if delayed > want and delayed > 0:
            want, kind = delayed, "panic" if kind == "panic" else "delay"
            text += f"; scale-down delay {c.scale_down_delay:g}s keeps {delayed}"
        # bounds, and zero only after a grace period without traffic
        floor = c.min_replicas
        if floor == 0 and (not c.scale_to_zero or now - self._last_traffic < c.scale_to_zero_grace):
            floor = 1 if (current > 0 or held) else 0
        if held and want < 1:
            want, kind = 1, "activation"
            text += "; requests are held by the balancer: activate one replica"
        if want < floor:
            want, kind = floor, kind or "min"
            text += f"; min {floor}"
        if want > c.max_replicas:
            want, kind = c.max_replicas, kind or "max"
            text += f"; max {c.max_replicas}"
        if want == 0 and current > 0:
            kind = "scale_to_zero"
            text += f"; no traffic for {c.scale_to_zero_grace:g}s: scale to zero"
        if not kind:
            kind = "scale_up" if want > current else "scale_down" if want < current else "hold"
        return Decision(want, f"{text} -> {want} replica(s)", self.panic, kind, observed)
