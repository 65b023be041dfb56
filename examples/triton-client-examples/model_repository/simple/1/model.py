"""simple: element-wise sum and difference of two INT32 tensors (Triton's qa model of the same name)."""

from modelyard.server.types import InferResponse


class Model:
    def execute(self, requests):
        out = []
        for r in requests:
            a, b = r.inputs["INPUT0"], r.inputs["INPUT1"]
            out.append(InferResponse(outputs={"OUTPUT0": a + b, "OUTPUT1": a - b}))
        return out
