"""identity: OUTPUT0 = INPUT0, whatever its datatype and shape."""

from modelyard.server.types import InferResponse


class Model:
    def execute(self, requests):
        return [InferResponse(outputs={"OUTPUT0": r.inputs["INPUT0"]}) for r in requests]
