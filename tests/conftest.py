"""Shared fixtures: tiny random models of the four architectures the caches are tested on.

ARKV_TEST_DEVICE=cuda runs the same tests on a GPU (fp32, so the exactness bounds still hold).
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from arkv_bench.cache import prepare_model

TINY = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048, eos_token_id=None, bos_token_id=None,
            pad_token_id=0)
DEVICE = torch.device(os.environ.get("ARKV_TEST_DEVICE", "cpu"))
# Tiny models gain nothing from several threads, and a shared 2-core machine loses a lot to them.
torch.set_num_threads(1)
ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 32}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
}


def tiny_model(arch: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """A random fp32 model of `arch` with GQA (2 query heads per KV head), attention through the hook."""
    config_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(seed)
    config = config_cls(**{**TINY, **extra, **overrides})
    model = model_cls(config).eval().to(DEVICE)
    return prepare_model(model)


@pytest.fixture(scope="session")
def llama() -> torch.nn.Module:
    return tiny_model("llama")


def prompt_ids(length: int, seed: int = 1, batch: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, TINY["vocab_size"], (batch, length), generator=generator).to(DEVICE)
