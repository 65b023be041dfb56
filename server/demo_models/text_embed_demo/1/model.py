"""text_embed_demo: a unit vector per text (hash-seeded, deterministic), after a simulated compute time."""

import hashlib
import time

import numpy as np

from modelyard.server.types import InferResponse

DIM = 8


class Model:
    def load(self, ctx):
        params = ctx.config.parameters
        self.compute_s = float(params.get("compute_ms", 0)) / 1e3
        self.per_item_s = float(params.get("compute_ms_per_item", 0)) / 1e3

    @staticmethod
    def _embed(raw: bytes) -> np.ndarray:
        seed = int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")
        v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
        return v / np.linalg.norm(v)

    def execute(self, requests):
        rows = sum(r.inputs["TEXT"].shape[0] for r in requests)
        # the accelerator's time for this batch: the thread sleeps, the GIL is free
        time.sleep(self.compute_s + self.per_item_s * rows)
        results = []
        for r in requests:
            texts = r.inputs["TEXT"].reshape(-1)
            vecs = np.stack([self._embed(t if isinstance(t, bytes) else str(t).encode()) for t in texts])
            results.append(InferResponse(outputs={"EMBEDDING": vecs.reshape(*r.inputs["TEXT"].shape[:-1], DIM)}))
        return results
