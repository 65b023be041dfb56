"""simple_string_dyna_sequence: the running sum of INPUT over the sequence (START answers its INPUT);
the END request adds the string correlation ID (CORRID control input), read as a decimal integer."""

import numpy as np

from modelyard.server.types import InferResponse


class Model:
    def execute(self, requests):
        out = []
        for r in requests:
            seq = r.sequence
            if seq.start:
                seq.state["sum"] = 0
            seq.state["sum"] += int(r.inputs["INPUT"].reshape(-1)[0])
            value = seq.state["sum"]
            if seq.end:
                corrid = r.inputs["CORRID"].reshape(-1)[0]
                value += int(corrid.decode() if isinstance(corrid, bytes) else corrid)
            out.append(InferResponse(outputs={"OUTPUT": np.array([[value]], dtype=np.int32)}))
        return out
