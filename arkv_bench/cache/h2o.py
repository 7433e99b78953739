"""H2O: heavy hitters by attention accumulated over every query so far, plus a recent window.

Each KV head keeps a running sum of the attention its tokens received (averaged over the
head's query group), prefill chunk by chunk and then every decoding step. When a layer
holds more than `cache_size` tokens, the tokens with the lowest sum are evicted; the last
`window_size` tokens are always kept.
"""

from __future__ import annotations

from typing import Any

import torch

from arkv_bench.cache.base import BenchCache
from arkv_bench.cache.store import SlotLayer, empty_like_slots, scatter_slots, take_or_empty

# Prefill attention weights scored at once (float32), whatever the batch: large launches on a GPU,
# cache-sized blocks on a CPU (8x faster there than one large block).
PROBS_ELEMENTS = {"cuda": 1 << 27, "cpu": 1 << 21}


class H2OLayer(SlotLayer):
    """The slots plus `acc` [B, Hkv, N] float32, the attention each slot's token has received."""

    def __init__(self, layer_idx: int, cache_size: int, window_size: int = 32, slack: int = 0, **_: Any):
        super().__init__(layer_idx, cache_size, window_size, slack)
        self.acc: torch.Tensor | None = None

    def accumulate(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        b, hq, n_q, _ = query.shape
        n = key.shape[2]
        fresh = torch.zeros(b, key.shape[1], n_q, dtype=torch.float32, device=key.device)
        self.acc = fresh if self.acc is None else torch.cat([self.acc, fresh], dim=2)
        step = max(1, PROBS_ELEMENTS.get(key.device.type, PROBS_ELEMENTS["cuda"]) // (b * hq * n))
        for first in range(0, n_q, step):
            last = min(first + step, n_q)
            seen = n - n_q + last  # prefill is dense: key i is column i, and no query of the block sees past `seen`
            self.add(self.probs(query, key[:, :, :seen], scaling, first, last))

    def add(self, a: torch.Tensor) -> None:
        """acc[..., :N] += the attention a [B, Hq, q, N], summed over queries and averaged over each KV group."""
        b, hq, _, n = a.shape
        self.acc[..., :n] += a.sum(dim=2).view(b, self.acc.shape[1], -1, n).mean(dim=2)

    def end_prefill(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        keep = self.keep_best(self.acc, self.pos) if self.over_budget() else self.live(self.pos)
        idx = self.build_store(keep)
        self.acc = take_or_empty(self.acc, idx)

    def on_write(self, slots: torch.Tensor) -> None:
        scatter_slots(self.acc, slots, torch.zeros_like(slots, dtype=self.acc.dtype))

    def grow_extras(self, extra: int) -> None:
        self.acc = torch.cat([self.acc, empty_like_slots(self.acc, extra)], dim=2)

    def after_decode(self, query: torch.Tensor, probs: torch.Tensor) -> None:
        self.add(probs)
        if self.evicting:
            self.acc.masked_fill_(self.evict(self.acc, query.shape[2]), 0.0)


class H2OCache(BenchCache):
    method = "h2o"
    layer_class = H2OLayer
    defaults = {"cache_size": 1024, "window_size": 32, "slack": 0}
