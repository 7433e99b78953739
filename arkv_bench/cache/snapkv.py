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

from arkv_bench.cache.base import BenchCache
from arkv_bench.cache.scoring import POOLINGS, heavy_hitter_score
from arkv_bench.cache.store import SlotLayer, pooled_score, rank_by_position

FLAGS = (False, True)


class SnapKVLayer(SlotLayer):
    """Compressed once at the end of prefill (and while decoding if asked); the store then grows by one
    token per step into slots reserved for the generation."""

    def __init__(self, layer_idx: int, cache_size: int, window_size: int = 32, pooling: str = "max",
                 kernel_size: int = 7, decode_compress: bool = False, **_: Any):
        super().__init__(layer_idx, cache_size, window_size)
        self.pooling, self.kernel_size, self.decode_compress = pooling, kernel_size, decode_compress
        self.decode_evicts = decode_compress

    def end_prefill(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        keep = self.keep_best(self.snap_score(query, key, scaling), self.pos) if self.over_budget() \
            else self.live(self.pos)
        self.build_store(keep)

    def keep_best(self, score: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The base selection on ranks: max pooling makes exact ties, and top-k breaks them by memory layout
        (a row alone and the same row left-padded in a batch would keep different tokens). A stable sort
        breaks them by position order instead: the earlier token wins."""
        rank = score.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
        return super().keep_best(-rank.float(), pos)

    def snap_score(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
        """SnapKV's score of every dense slot [B, Hkv, N]; window slots score 0 (they are protected)."""
        n_q = query.shape[2]
        first = n_q - min(self.window_size, n_q)
        # Only non-window keys are scored: zeroing the window's columns before pooling is the same as
        # cutting them off (the paper's A[..., -W:, :-W]) and also holds when heads hold padding slots.
        window = self.protected(self.pos).repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        scores = []
        for rows in self.row_blocks(query, key, first):
            a = self.probs(query, key, scaling, first=first, rows=rows)
            scores.append(heavy_hitter_score(a.masked_fill(window[rows].unsqueeze(2), 0.0), 0.0, self.pooling,
                                             self.kernel_size, key.shape[1]))
        return torch.cat(scores)

    def decode_score(self, probs: torch.Tensor) -> torch.Tensor:
        """The same score from this step's queries over the slots; ties go to the earlier position."""
        n_q = probs.shape[2]
        pos = self.pos
        score = pooled_score(probs[:, :, n_q - min(self.window_size, n_q):], pos, self.protected_t(pos), 0.0,
                             self.pooling, self.kernel_size)
        return rank_by_position(score, pos)


class SnapKVCache(BenchCache):
    method = "snapkv"
    layer_class = SnapKVLayer
    defaults = {"cache_size": 1024, "window_size": 32, "pooling": "max", "kernel_size": 7, "decode_compress": False}
    choices = {"pooling": POOLINGS, "decode_compress": FLAGS}

    def layer_extra(self, layer_idx: int) -> dict[str, Any]:
        return {"budget": self.layers[layer_idx].cache_size}
