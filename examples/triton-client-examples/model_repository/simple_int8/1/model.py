"""simple_int8: element-wise sum and difference of two INT8 tensors (wrapping like Triton's int8 add_sub)."""

from modelyard.server.types import InferResponse


class Model:
    def execute(self, requests):
        out = []
        for r in requests:
            a, b = r.inputs["INPUT0"], r.inputs["INPUT1"]
            out.append(InferResponse(outputs={"OUTPUT0": a + b, "OUTPUT1": a - b}))
        return out
