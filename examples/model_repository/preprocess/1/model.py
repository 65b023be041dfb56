"""Images -> pixel_values: decode (bytes) or take (UINT8 [batch, H, W, C]) pixels, resize, rescale, normalise."""

import io
import json

import numpy as np
from PIL import Image

from modelyard.server.errors import InvalidInput
from modelyard.server.types import InferResponse


class Model:
    def load(self, ctx):
        pre = json.loads((ctx.version_dir / ctx.config.parameters["preprocessor_config"]).read_text())
        size = pre["size"]
        self.hw = (int(size["height"]), int(size["width"]))
        self.rescale = float(pre.get("rescale_factor", 1 / 255))
        self.mean = np.asarray(pre.get("image_mean", [0.5, 0.5, 0.5]), np.float32)
        self.std = np.asarray(pre.get("image_std", [0.5, 0.5, 0.5]), np.float32)

    def _images(self, arr):
        if arr.dtype == object:
            try:
                return [Image.open(io.BytesIO(bytes(b))).convert("RGB") for b in arr.reshape(-1)]
            except OSError as exc:
                raise InvalidInput(f"input 'IMAGE': not a decodable image: {exc}") from None
        if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
            raise InvalidInput(f"input 'IMAGE': raw pixels must be [batch, H, W, C], got {list(arr.shape)}")
        return [Image.fromarray(np.ascontiguousarray(x.squeeze(-1) if x.shape[-1] == 1 else x)).convert("RGB")
                for x in arr]

    def execute(self, requests):
        h, w = self.hw
        out = []
        for r in requests:
            try:
                images = self._images(r.inputs["IMAGE"])
            except InvalidInput as exc:
                out.append(exc)
                continue
            px = [np.asarray(im.resize((w, h), Image.Resampling.BILINEAR), np.float32) * self.rescale for im in images]
            out.append(InferResponse(outputs={"pixel_values": np.stack(
                [((p - self.mean) / self.std).transpose(2, 0, 1) for p in px]).astype(np.float32)}))
        return out
