"""L2 norm of each row; rows of different lengths in one batch are fine (each request keeps its own)."""

import numpy as np

from modelyard.server.types import InferResponse


class Model:
    def execute(self, requests):
        return [InferResponse(outputs={"NORM": np.linalg.norm(r.inputs["X"], axis=1, keepdims=True)}) for r in requests]
