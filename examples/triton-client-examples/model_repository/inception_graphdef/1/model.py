"""inception_graphdef stand-in: a fixed random linear map of per-channel image means, softmaxed over
1001 classes. Deterministic, weightless: it has the real model's interface, not its answers."""

import numpy as np

from modelyard.server.types import InferResponse

OUTPUT = "InceptionV3/Predictions/Softmax"


class Model:
    def load(self, ctx):
        self.weights = np.random.default_rng(0).standard_normal((3, 1001)).astype(np.float32)

    def execute(self, requests):
        out = []
        for r in requests:
            images = np.asarray(r.inputs["input"], dtype=np.float32)
            features = images.reshape(images.shape[0], -1, 3).mean(axis=1)
            logits = features @ self.weights
            probs = np.exp(logits - logits.max(axis=1, keepdims=True))
            out.append(InferResponse(outputs={OUTPUT: (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)}))
        return out
