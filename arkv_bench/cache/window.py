"""StreamingLLM: `n_sink` attention-sink tokens (the first ones) plus the most recent tokens."""

from __future__ import annotations

from typing import Any

import torch

from arkv_bench.cache.base import BenchCache, TokenLayer


class WindowLayer(TokenLayer):
    """Full-precision store; over budget, keep the sinks and the newest `cache_size - n_sink` tokens."""

    def __init__(self, layer_idx: int, cache_size: int, window_size: int = 32, n_sink: int = 4, slack: int = 0,
                 **_: Any):
        super().__init__(layer_idx, cache_size, window_size, slack)
        self.n_sink = n_sink

    def may_hold_empty(self) -> bool:
        return self.padded  # it keeps exactly its budget of real tokens per head

    def after_attention(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        if not self.over_budget():
            return
        sink = self.live(self.pos) & (self.pos - self.start.view(-1, 1, 1) < self.n_sink)
        recency = self.pos.float().masked_fill(sink, float("inf"))
        self.keep(self.keep_best(recency, self.pos), self.budget_capacity(self.pos.shape[-1]))


class WindowCache(BenchCache):
    method = "window"
    layer_class = WindowLayer
    defaults = {"cache_size": 1024, "window_size": 32, "n_sink": 4, "slack": 0}
