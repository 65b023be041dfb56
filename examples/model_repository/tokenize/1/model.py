"""Texts -> input_ids and attention_mask (INT64, each request padded to its own longest text)."""

import importlib
import os

import numpy as np

from modelyard.server.types import InferResponse


class Model:
    def load(self, ctx):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer

        package = importlib.import_module(ctx.config.parameters["pretrained_package"])
        self.tokenizer = AutoTokenizer.from_pretrained(package.get_model_path(), local_files_only=True)
        self.max_length = int(ctx.config.parameters.get("max_length", 256))

    def execute(self, requests):
        out = []
        for r in requests:
            texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in r.inputs["TEXT"].reshape(-1)]
            enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="np")
            out.append(InferResponse(outputs={"input_ids": enc["input_ids"].astype(np.int64),
                                              "attention_mask": enc["attention_mask"].astype(np.int64)}))
        return out
