"""custom_identity_int32: OUTPUT0 is INPUT0."""

from modelyard.server.types import InferResponse


class Model:
    def execute(self, requests):
        return [InferResponse(outputs={"OUTPUT0": r.inputs["INPUT0"]}) for r in requests]
