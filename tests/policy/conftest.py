"""Fixtures shared by the policy torch tests: a tiny grouped-query config and the real Llama 2 tokenizer."""

from pathlib import Path

import pytest
import torch

from policy.model import ModelArgs, Transformer

LLAMA2_TOKENIZER = Path(__file__).resolve().parents[2] / "../shared/data/llama2-tokenizer/tokenizer.model"


@pytest.fixture
def tiny_args() -> ModelArgs:
    # 4 query heads share 2 key/value heads; ffn_dim_multiplier and multiple_of both take effect.
    return ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16,
                     ffn_dim_multiplier=1.3, norm_eps=1e-5, max_seq_len=64)


@pytest.fixture
def tiny_model(tiny_args: ModelArgs) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(tiny_args).eval()
    # Non-trivial norm gains, so a norm applied in the wrong place shows up in the logits.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model


@pytest.fixture
def llama2_tokenizer_path() -> Path:
    if not LLAMA2_TOKENIZER.exists():
        pytest.skip(f"Llama 2 tokenizer not found at {LLAMA2_TOKENIZER}")
    return LLAMA2_TOKENIZER
