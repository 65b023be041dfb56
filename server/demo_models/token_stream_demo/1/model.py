"""token_stream_demo: streams TEXT back one token per response (stops when the client cancels)."""

import time

import numpy as np

from modelyard.server.types import InferResponse


class Model:
    def _tokens(self, request):
        return request.inputs["TEXT"].reshape(-1)[0].split()

    def execute(self, requests):
        # Non-streaming callers get all tokens at once.
        return [
            InferResponse(outputs={
                "TOKEN": np.array([b" ".join(self._tokens(r))], dtype=object),
                "INDEX": np.array([len(self._tokens(r))], dtype=np.int32),
            })
            for r in requests
        ]

    def stream(self, request, cancelled):
        delay = 0.0
        if "DELAY_MS" in request.inputs:
            delay = float(request.inputs["DELAY_MS"].reshape(-1)[0]) / 1000.0
        tokens = self._tokens(request)
        for i, token in enumerate(tokens):
            if cancelled():
                return
            if delay:
                time.sleep(delay)
            yield InferResponse(
                outputs={"TOKEN": np.array([token], dtype=object), "INDEX": np.array([i], dtype=np.int32)},
                final=i == len(tokens) - 1,
            )
