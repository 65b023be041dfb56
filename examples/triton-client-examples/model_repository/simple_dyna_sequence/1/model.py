"""simple_dyna_sequence: as simple_sequence (START answers INPUT + 1, later requests their INPUT), and the
END request adds the sequence's correlation ID, read from the CORRID control input."""

import numpy as np

from modelyard.server.types import InferResponse


class Model:
    def execute(self, requests):
        out = []
        for r in requests:
            value = int(r.inputs["INPUT"].reshape(-1)[0])
            if r.sequence.start:
                value += 1
            if r.sequence.end:
                value += int(r.inputs["CORRID"].reshape(-1)[0])
            out.append(InferResponse(outputs={"OUTPUT": np.array([[value]], dtype=np.int32)}))
        return out
