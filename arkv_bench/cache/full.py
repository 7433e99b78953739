"""`full`: the model's own dynamic cache, everything at full precision: the reference point.
It never marks itself pending, so the attention hook goes straight to SDPA.

`full-static`: transformers' static layers (preallocated for the prompt plus the tokens to
generate, written in place), so its decode step can be replayed from a CUDA graph like the
budgeted methods': the fastest full-cache baseline."""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import StaticLayer

from arkv_bench.cache.base import BenchCache, FullLayer, tensor_bytes

NOT_RESERVED = "full-static is sized by the generation loop: call cache.reserve(prompt_width, new_tokens) before the prompt"


class FullCache(BenchCache):
    method = "full"
    layer_class = FullLayer
    budgeted = False
    defaults = {"cache_size": None, "window_size": 32}


class FullStaticLayer(StaticLayer):
    """transformers' StaticLayer [B, H, max_cache_len, D], with accounting."""

    def __init__(self, layer_idx: int, **_: Any):
        super().__init__(max_cache_len=0)
        self.layer_idx = layer_idx
        self.triggered = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if self.max_cache_len <= 0:
            raise RuntimeError(NOT_RESERVED)
        super().lazy_initialization(key_states, value_states)

    def seen(self) -> int:
        return int(self.cumulative_length) if self.is_initialized else 0

    def nbytes(self) -> int:
        return tensor_bytes(self.keys, self.values, self.cumulative_length) if self.is_initialized else 0

    def counts(self) -> dict[str, float]:
        seen = float(self.seen())
        return {"seen": seen, "original": seen, "quantized": 0.0, "evicted": 0.0}


class FullStaticCache(BenchCache):
    method = "full-static"
    layer_class = FullStaticLayer
    budgeted = False
    defaults = {"cache_size": None, "window_size": 32}

    def reserve(self, prompt: int, new_tokens: int) -> None:
        """Size every layer for the prompt's width plus the tokens to generate."""
        total = prompt + new_tokens
        for layer in self.layers:
            if layer.is_initialized and layer.max_cache_len < total:
                raise RuntimeError(f"full-static holds {layer.max_cache_len} tokens, {total} asked: reset it first")
            layer.max_cache_len = max(layer.max_cache_len, total)

    def step_mask(self, attention_mask: torch.Tensor, new_tokens: int) -> torch.Tensor | None:
        """The prompt's padding, then every later slot visible (causality hides the future ones)."""
        room = self.layers[0].max_cache_len - attention_mask.shape[1]
        return torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], room)], dim=1)

    def full_kv_bytes(self) -> int:
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                b, h, _, d = layer.keys.shape
                total += 2 * b * h * layer.seen() * d * layer.keys.element_size()
        return total

    def plan(self, q: int) -> tuple | None:
        return (q,) if all(layer.is_initialized for layer in self.layers) else None

    def advance(self, q: int) -> None:
        """Nothing on the host: the layers count on the device."""

