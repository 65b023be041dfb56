"""simple_sequence: what Triton's sequence examples expect of it without --dyna: the START request of a
sequence answers INPUT + 1, every later request answers its own INPUT. Takes integer and string
correlation IDs (the examples send a UUID string)."""

import numpy as np

from modelyard.server.types import InferResponse


class Model:
    def execute(self, requests):
        out = []
        for r in requests:
            value = int(r.inputs["INPUT"].reshape(-1)[0])
            if r.sequence is not None and r.sequence.start:
                value += 1
            out.append(InferResponse(outputs={"OUTPUT": np.array([[value]], dtype=np.int32)}))
        return out
