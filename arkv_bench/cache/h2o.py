"""H2O: heavy hitters by attention accumulated over every query so far, plus a recent window.

Each KV head keeps a running sum of the attention its tokens received (averaged over the
head's query group). When a layer holds more than `cache_size` tokens, the tokens with the
lowest sum are evicted; the last `window_size` tokens are always kept.
"""

from __future__ import annotations

from typing import Any

import torch

from arkv_bench.cache.base import BenchCache, TokenLayer, tensor_bytes

QUERY_CHUNK = 256  # prefill queries scored at once: bounds the [B, H, chunk, N] weights in memory


class H2OLayer(TokenLayer):
    """Full-precision store plus `acc` [B, Hkv, n] float32, the attention each slot has received."""

    def __init__(self, layer_idx: int, cache_size: int, window_size: int = 32, slack: int = 0, **_: Any):
        super().__init__(layer_idx, cache_size, window_size, slack)
        self.acc: torch.Tensor | None = None

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().append(key_states, value_states)
        b, h, q, _ = key_states.shape
        fresh = torch.zeros(b, h, q, dtype=torch.float32, device=key_states.device)
        self.acc = fresh if self.acc is None else torch.cat([self.acc, fresh], dim=2)

    def may_hold_empty(self) -> bool:
        return self.padded  # it keeps exactly its budget of real tokens per head

    def after_attention(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        kv_heads, n_q = key.shape[1], query.shape[2]
        for first in range(0, n_q, QUERY_CHUNK):
            a = self.probs(query, key, scaling, first, min(first + QUERY_CHUNK, n_q))
            b, hq, _, n = a.shape
            self.acc += a.sum(dim=2).view(b, kv_heads, hq // kv_heads, n).mean(dim=2)
        if self.over_budget():
            keep = self.keep_best(self.acc, self.pos)
            idx, valid = self.keep(keep, self.budget_capacity(keep.shape[-1]))
            self.acc = torch.where(valid, self.acc.gather(2, idx), 0.0)

    def nbytes(self) -> int:
        return super().nbytes() + tensor_bytes(self.acc)


class H2OCache(BenchCache):
    method = "h2o"
    layer_class = H2OLayer
    defaults = {"cache_size": 1024, "window_size": 32, "slack": 0}
