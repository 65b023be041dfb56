"""Plain request/response objects that everything below the servicers works with."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

Parameters = dict[str, Any]


@dataclass(slots=True)
class Sequence:
    """The sequence a request of a sequence-batched model belongs to (``request.sequence``).

    ``state`` is the sequence's own dict, kept by the server from the START request to the
    END request (or the idle timeout) and handed to every request of the sequence in order:
    a python model keeps its per-sequence values there (thread execution; a worker process
    gets a copy).
    """

    id: int | str
    start: bool = False
    end: bool = False
    state: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class InferRequest:
    """One inference request, decoded: inputs are numpy arrays keyed by tensor name."""

    model: str
    inputs: dict[str, np.ndarray]
    version: str = ""
    id: str = ""
    parameters: Parameters = field(default_factory=dict)
    #: names of the outputs the client asked for; None = all
    outputs: list[str] | None = None
    #: per-output parameters the client sent (e.g. classification), by name
    output_parameters: dict[str, Parameters] = field(default_factory=dict)
    priority: int = 0
    #: absolute monotonic deadline in seconds, or None
    deadline: float | None = None
    #: set by the sequence batcher for sequence-batched models
    sequence: Sequence | None = None

    def batch_size(self) -> int:
        """Leading dimension of the first input (1 for scalars or no inputs)."""
        for arr in self.inputs.values():
            return int(arr.shape[0]) if arr.ndim else 1
        return 1


@dataclass(slots=True)
class InferResponse:
    """One response: outputs keyed by tensor name, plus response parameters."""

    outputs: dict[str, np.ndarray]
    parameters: Parameters = field(default_factory=dict)
    model: str = ""
    version: str = ""
    id: str = ""
    #: for streamed (decoupled) responses: this is the last one
    final: bool = True
