"""simple_string: "simple" over strings: each element is the decimal text of an integer."""

import numpy as np

from modelyard.server.types import InferResponse


def _ints(arr):
    return np.vectorize(lambda x: int(x.decode() if isinstance(x, bytes) else x), otypes=[np.int64])(arr)


def _text(arr):
    return np.vectorize(lambda x: str(int(x)).encode(), otypes=[object])(arr)


class Model:
    def execute(self, requests):
        out = []
        for r in requests:
            a, b = _ints(r.inputs["INPUT0"]), _ints(r.inputs["INPUT1"])
            out.append(InferResponse(outputs={"OUTPUT0": _text(a + b), "OUTPUT1": _text(a - b)}))
        return out
