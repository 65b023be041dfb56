"""repeat_int32: streams IN back one element per response (OUT = [IN[i]], IDX = [i]), sleeping DELAY[i]
milliseconds before each. WAIT (how long Triton's backend holds the request after the last response)
is accepted and not used."""

import time

import numpy as np

from modelyard.server.types import InferResponse


class Model:
    def _responses(self, request, cancelled=lambda: False):
        values = request.inputs["IN"].reshape(-1)
        delays = request.inputs["DELAY"].reshape(-1)
        for i, value in enumerate(values):
            if cancelled():
                return
            time.sleep(float(delays[i] if i < len(delays) else 0) / 1000.0)
            yield InferResponse(
                outputs={"OUT": np.array([value], dtype=np.int32), "IDX": np.array([i], dtype=np.uint32)},
                final=i == len(values) - 1,
            )

    def execute(self, requests):
        # a unary (non-streaming) call gets the last element only
        out = []
        for r in requests:
            responses = list(self._responses(r))
            out.append(responses[-1] if responses else InferResponse(outputs={}))
        return out

    def stream(self, request, cancelled):
        yield from self._responses(request, cancelled)
