"""Tiny random-weight BERT / GPT-2 / ViT models and tokenizers, built locally with save_pretrained.

Tests and ``examples/make_tiny_models.py`` use them to serve every ``transformers``
task through the real code path in a second, without any download: tokenizers are
constructed here from a small vocabulary, never fetched from a hub.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

_WORDS = (
    "the a an and or but is are was were be to of in on at for with from by this that it as i you he she we they "
    "good great love excellent happy fast nice best bad awful hate terrible sad slow worst model server batch "
    "request token stream text image hello world once upon time there lived small cat dog"
).split()
_CORPUS = [
    "once upon a time there lived a small cat and a small dog",
    "the model server batches every request and streams each token",
    "hello world this is a good text and that is a bad text",
] * 20


def _bert_tokenizer(out: Path) -> int:
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = specials + _WORDS + chars + ["##" + c for c in string.ascii_lowercase + string.digits]
    vocab = list(dict.fromkeys(vocab))
    out.mkdir(parents=True, exist_ok=True)
    vocab_file = out / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True, model_max_length=64)
    tok.save_pretrained(str(out))
    return len(vocab)


def build_tiny_bert(out: Path, *, task: str = "embedding", num_labels: int = 3, seed: int = 0) -> Path:
    """A 2-layer, 32-wide BERT (``embedding`` -> BertModel, else BertForSequenceClassification)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    vocab_size = _bert_tokenizer(out)
    torch.manual_seed(seed)
    labels = {i: name for i, name in enumerate(["negative", "neutral", "positive", "other"][:num_labels])}
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=num_labels,
                     id2label=labels, label2id={v: k for k, v in labels.items()})
    model = BertModel(cfg) if task == "embedding" else BertForSequenceClassification(cfg)
    model.save_pretrained(str(out))
    return out


def build_tiny_gpt2(out: Path, *, seed: int = 0) -> Path:
    """A 2-layer, 32-wide GPT-2 with a byte-level BPE tokenizer trained here on a few sentences."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_CORPUS, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>", model_max_length=128)
    tok.save_pretrained(str(out))
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=eos, eos_token_id=eos)
    GPT2LMHeadModel(cfg).save_pretrained(str(out))
    return out


def build_tiny_vit(out: Path, *, num_labels: int = 4, image_size: int = 32, seed: int = 0) -> Path:
    """A 2-layer ViT classifier over ``image_size`` squares, with its preprocessing config."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    labels = {i: f"class_{i}" for i in range(num_labels)}
    cfg = ViTConfig(image_size=image_size, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, num_labels=num_labels, id2label=labels,
                    label2id={v: k for k, v in labels.items()})
    ViTForImageClassification(cfg).save_pretrained(str(out))
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "do_resize": True,
        "size": {"height": image_size, "width": image_size}, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    }, indent=2))
    return out


def build_tiny_torchscript(out: Path, *, seed: int = 0) -> Path:
    """``model.pt``: a scripted Linear(4 -> 2) + softmax (INPUT0 FP32 [4] -> OUTPUT0 FP32 [2])."""
    import torch

    torch.manual_seed(seed)

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.linear(x), dim=-1)

    out.mkdir(parents=True, exist_ok=True)
    torch.jit.script(Tiny().eval()).save(str(out / "model.pt"))
    return out
