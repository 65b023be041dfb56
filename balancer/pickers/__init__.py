"""Load-balancing policies, one module each, registered by name in :data:`PICKERS`."""

from __future__ import annotations

from modelyard.balancer.pickers.base import BasePicker, Picker
from modelyard.balancer.pickers.least_conn import LeastConn
from modelyard.balancer.pickers.least_latency import LeastLatency
from modelyard.balancer.pickers.peak_ewma import PeakEwma
from modelyard.balancer.pickers.random_choice import RandomPicker
from modelyard.balancer.pickers.round_robin import RoundRobin
from modelyard.balancer.pickers.weighted_round_robin import WeightedRoundRobin

#: policy name (as written in the config file) -> picker class
PICKERS: dict[str, type[BasePicker]] = {
    cls.name: cls for cls in (RoundRobin, WeightedRoundRobin, RandomPicker, LeastConn, PeakEwma, LeastLatency)
}

__all__ = ["PICKERS", "BasePicker", "LeastConn", "LeastLatency", "PeakEwma", "Picker", "RandomPicker", "RoundRobin",
           "WeightedRoundRobin"]
