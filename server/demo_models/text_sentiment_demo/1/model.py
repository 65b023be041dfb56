"""text_sentiment_demo: counts positive and negative words; score in [-1, 1]."""

import re

import numpy as np

from modelyard.server.errors import InvalidInput
from modelyard.server.types import InferResponse

_WORD = re.compile(r"[a-z']+")


class Model:
    def load(self, ctx):
        params = ctx.config.parameters
        self.positive = set(str(params.get("positive_words", "")).split())
        self.negative = set(str(params.get("negative_words", "")).split())

    def _score(self, raw: bytes) -> float:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput("input 'TEXT': not valid UTF-8") from None
        words = _WORD.findall(text.lower())
        pos = sum(w in self.positive for w in words)
        neg = sum(w in self.negative for w in words)
        return 0.0 if pos + neg == 0 else (pos - neg) / (pos + neg)

    def execute(self, requests):
        results = []
        for r in requests:
            try:
                texts = r.inputs["TEXT"].reshape(-1)
                scores = np.array([self._score(t) for t in texts], dtype=np.float32)
            except InvalidInput as exc:
                results.append(exc)
                continue
            labels = np.array(
                [b"positive" if s > 0 else b"negative" if s < 0 else b"neutral" for s in scores], dtype=object
            )
            shape = r.inputs["TEXT"].shape
            results.append(InferResponse(outputs={"LABEL": labels.reshape(shape), "SCORE": scores.reshape(shape)}))
        return results
