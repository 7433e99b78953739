"""StreamingLLM: `n_sink` attention-sink tokens (the first ones) plus the most recent tokens."""

from __future__ import annotations

from typing import Any

import torch

from arkv_bench.cache.base import BenchCache
from arkv_bench.cache.store import SlotLayer


class WindowLayer(SlotLayer):
    """Over budget, keep the sinks and the newest `cache_size - n_sink` tokens (score: recency)."""

    def __init__(self, layer_idx: int, cache_size: int, window_size: int = 32, n_sink: int = 4, slack: int = 0,
                 **_: Any):
        super().__init__(layer_idx, cache_size, window_size, slack)
        self.n_sink = n_sink

    def recency(self, pos: torch.Tensor) -> torch.Tensor:
        sink = self.live(pos) & (pos - self.start.view(-1, 1, 1) < self.n_sink)
        return pos.float().masked_fill(sink, float("inf"))

    def end_prefill(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        keep = self.keep_best(self.recency(self.pos), self.pos) if self.over_budget() else self.live(self.pos)
        self.build_store(keep)

    def decode_score(self, probs: torch.Tensor) -> torch.Tensor:
        return self.recency(self.pos)


class WindowCache(BenchCache):
    method = "window"
    layer_class = WindowLayer
    defaults = {"cache_size": 1024, "window_size": 32, "n_sink": 4, "slack": 0}
