"""Write the random weights of the tiny example models into examples/model_repository/*/1/.

    .venv/bin/python examples/make_tiny_models.py
    .venv/bin/modelyard serve --model-repository examples/model_repository
"""

from __future__ import annotations

from pathlib import Path

from modelyard.server.execution.runtimes import transformers_tiny as tiny

REPO = Path(__file__).resolve().parent / "model_repository"


def main() -> None:
    """Build every tiny model (seconds, no download)."""
    tiny.build_tiny_bert(REPO / "tiny_classifier" / "1", task="sequence-classification")
    tiny.build_tiny_gpt2(REPO / "tiny_gpt2" / "1")
    tiny.build_tiny_vit(REPO / "tiny_vit" / "1")
    tiny.build_tiny_torchscript(REPO / "tiny_torchscript" / "1")
    print(f"tiny models written under {REPO}")


if __name__ == "__main__":
    main()
