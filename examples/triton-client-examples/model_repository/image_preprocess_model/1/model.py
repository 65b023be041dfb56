"""image_preprocess_model: decodes each encoded image (Pillow), RGB, resized to 299x299, scaled to [-1, 1].
Pillow is imported on the first request, so the repository loads where it is not installed
(``pip install pillow``, or the ``modelyard[torch]`` extra, to run the ensemble)."""

import io

import numpy as np

from modelyard.server.types import InferResponse


def _decode(data):
    from PIL import Image

    image = Image.open(io.BytesIO(bytes(data))).convert("RGB").resize((299, 299), Image.BILINEAR)
    return np.asarray(image, dtype=np.float32) / 127.5 - 1.0


class Model:
    def execute(self, requests):
        out = []
        for r in requests:
            images = [_decode(x) for x in r.inputs["INPUT"].reshape(-1)]
            out.append(InferResponse(outputs={"OUTPUT": np.stack(images).astype(np.float32)}))
        return out
