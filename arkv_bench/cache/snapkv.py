"""SnapKV: keep the prompt tokens that the prompt's last queries attend to.

At the end of prefill, the last `window_size` queries (the observation window) score every
earlier token by the attention it receives from them (softmax over all keys, causal inside
the window), averaged over the window's queries; the score is pooled over `kernel_size`
neighbouring tokens (max pooling by default, as the paper; `pooling="avg"` is the other
choice) and averaged over the query heads of each KV group. The top `cache_size -
window_size` tokens stay, with the window; the rest are evicted.

Decoding does not compress (the cache grows by one token per step) unless
`decode_compress=True`: then, whenever a layer holds more than its budget, the step's
queries score the non-window tokens the same way and the budget is restored.

The per-layer budget is `cache_size`; PyramidKV (pyramidkv.py) gives each layer its own,
AdaKV (adakv.py) splits a layer's budget unevenly between heads.
"""

from __future__ import annotations

from typing import Any

import torch

from arkv_bench.cache.base import BenchCache, TokenLayer
from arkv_bench.cache.scoring import POOLINGS, heavy_hitter_score

FLAGS = (False, True)


class SnapKVLayer(TokenLayer):
    """Full-precision store; compressed once at the end of prefill (and while decoding if asked)."""

    def __init__(self, layer_idx: int, cache_size: int, window_size: int = 32, pooling: str = "max",
                 kernel_size: int = 7, decode_compress: bool = False, **_: Any):
        super().__init__(layer_idx, cache_size, window_size)
        self.pooling, self.kernel_size, self.decode_compress = pooling, kernel_size, decode_compress
        self.prefilled = False

    def after_attention(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        prefill, self.prefilled = not self.prefilled, True
        if not (prefill or self.decode_compress) or not self.over_budget():
            return
        keep = self.keep_best(self.snap_score(query, key, scaling), self.pos)
        self.keep(keep, self.budget_capacity(keep.shape[-1]))

    def keep_best(self, score: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The base selection on ranks: max pooling makes exact ties, and top-k breaks them by memory layout
        (a row alone and the same row left-padded in a batch would keep different tokens). A stable sort
        breaks them by position order instead: the earlier token wins."""
        rank = score.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
        return super().keep_best(-rank.float(), pos)

    def snap_score(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
        """SnapKV's score of every held slot [B, Hkv, N]; window slots score 0 (they are protected)."""
        n_q = query.shape[2]
        a = self.probs(query, key, scaling, first=n_q - min(self.window_size, n_q))
        # Only non-window keys are scored: zeroing the window's columns before pooling is the same as
        # cutting them off (the paper's A[..., -W:, :-W]) and also holds when heads hold padding slots.
        window = self.protected(self.pos).repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        return heavy_hitter_score(a.masked_fill(window.unsqueeze(2), 0.0), 0.0, self.pooling, self.kernel_size,
                                  key.shape[1])


class SnapKVCache(BenchCache):
    method = "snapkv"
    layer_class = SnapKVLayer
    defaults = {"cache_size": 1024, "window_size": 32, "pooling": "max", "kernel_size": 7, "decode_compress": False}
    choices = {"pooling": POOLINGS, "decode_compress": FLAGS}

    def layer_extra(self, layer_idx: int) -> dict[str, Any]:
        return {"budget": self.layers[layer_idx].cache_size}
