"""AdaKV: head-wise adaptive budgets on top of SnapKV's scoring.

A layer's budget is `cache_size x n_kv_heads` tokens. Instead of `cache_size` per head,
each head keeps its window, and the rest of the layer's budget goes to the highest-scoring
(head, token) pairs over all the layer's heads, so heads whose attention is spread keep
more than heads whose attention is concentrated. A safeguard first reserves, for every
head, its own top `ceil(alpha x its uniform share)` tokens (the uniform share is
`cache_size` minus the head's window tokens). `alpha = 1` is SnapKV; `alpha = 0` is a pure
global top-k.

Layout: heads then hold different numbers of tokens. The store stays one [B, H, n, D]
tensor per layer, padded to the longest head with empty slots (position -1) that attention
never sees (they fail the `live` test). `kv_bytes()` counts the padding, since it is
allocated; `stats()` adds `kv_bytes_unpadded`, what a layout without padding (e.g. a
varlen kernel's) would need, and each layer's `padding_slots`.

The same allocation is the `head_budget="adaptive"` option of `mix` (ARKV): see
`HeadBudgets`, which any `SlotLayer` subclass can mix in.
"""

from __future__ import annotations

from typing import Any

import torch

from arkv_bench.cache.store import SlotLayer, position_order
from arkv_bench.cache.snapkv import SnapKVCache, SnapKVLayer

HEAD_BUDGETS = ("uniform", "adaptive")


def adaptive_allocation(score: torch.Tensor, share: torch.Tensor, alpha: float) -> torch.Tensor:
    """AdaKV's allocation: which (head, slot) pairs to keep, [B, H, N] bool.

    `score` [B, H, N] ranks the candidate slots (-inf: not a candidate); `share` [B, H] is each
    head's uniform share. Every head first keeps its top `ceil(alpha x share)` candidates; the
    rest of the row's total `sum_h share` goes to the best remaining pairs over all heads.
    """
    b, h, n = score.shape
    candidate = score > float("-inf")
    reserved_n = torch.ceil(alpha * share.float() - 1e-6).long().clamp_min(0)
    rank_in_head = score.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
    reserved = candidate & (rank_in_head < reserved_n.unsqueeze(-1))
    rest = score.masked_fill(reserved, float("-inf")).reshape(b, h * n)
    rest_n = share.sum(dim=-1) - reserved.reshape(b, -1).sum(dim=-1)
    rank_in_row = rest.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
    chosen = (rank_in_row < rest_n.unsqueeze(-1)) & (rest > float("-inf"))
    return reserved | chosen.view(b, h, n)


class HeadBudgets:
    """Mixin for `SlotLayer` subclasses: `head_budget` "uniform" (`cache_size` per head, the base
    behaviour) or "adaptive" (AdaKV: `cache_size x heads` per layer, split by score, safeguard `alpha`)."""

    head_budget = "uniform"
    alpha = 0.2

    def keep_best(self, score: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if self.head_budget == "uniform":
            return super().keep_best(score, pos)
        order = position_order(pos)  # in position order: ties do not depend on where tokens are stored
        pos, score = pos.gather(-1, order), score.gather(-1, order)
        live = self.live(pos)
        window = live & self.protected(pos)
        share = (self.cache_size - window.sum(dim=-1)).clamp_min(0)
        keep = adaptive_allocation(score.masked_fill(window | ~live, float("-inf")), share, self.alpha)
        return torch.empty_like(keep).scatter_(-1, order, keep | window)

    def budget_capacity(self, n: int) -> int | None:
        """Adaptive heads keep data-dependent numbers of slots: pad to the longest (None)."""
        return super().budget_capacity(n) if self.head_budget == "uniform" else None

    def over_budget(self) -> bool:
        if self.head_budget == "uniform":
            return super().over_budget()
        pos = self.all_positions()
        return int(self.live(pos).sum(dim=(1, 2)).max()) > self.cache_size * pos.shape[1]

    # Heads hold data-dependent numbers of tokens: a decode step that may evict runs eagerly and
    # looks at the counts (a device sync), and the store grows when a head runs out of slots.
    def plan(self, q: int) -> tuple | None:
        if self.head_budget == "adaptive" and self.decode_evicts:
            return None
        return super().plan(q)

    def held_original(self) -> int:
        if self.head_budget == "uniform" or not self.stored or not self.decode_evicts:
            return super().held_original()  # without decode eviction every head grows by one per token
        return int((self.pos >= 0).sum(dim=-1).max())

    def will_evict(self, q: int) -> bool:
        if self.head_budget == "uniform" or not self.stored:
            return super().will_evict(q)
        pos = self.all_positions()
        return self.decode_evicts and int(self.live(pos).sum(dim=(1, 2)).max()) + q * pos.shape[1] > \
            self.cache_size * pos.shape[1]

    def evict(self, score: torch.Tensor, q: int) -> torch.Tensor:
        if self.head_budget == "uniform":
            return super().evict(score, q)
        pos = self.all_positions()
        return self.empty_slots(~self.keep_best(score, pos) & (pos >= 0))


class AdaKVLayer(HeadBudgets, SnapKVLayer):
    """SnapKV's layer with the adaptive head budgets."""

    def __init__(self, layer_idx: int, cache_size: int, window_size: int = 32, alpha: float = 0.2, **options: Any):
        super().__init__(layer_idx, cache_size, window_size, **options)
        self.head_budget, self.alpha = "adaptive", alpha


def padding_slots(layer: SlotLayer) -> int:
    """Allocated slots that hold no real token (heads shorter than the longest, left padding)."""
    if layer.pos is None or layer.start is None:
        return 0
    return int(layer.pos.numel() - layer.live(layer.pos).sum())


class AdaKVCache(SnapKVCache):
    method = "adakv"
    layer_class = AdaKVLayer
    defaults = {**SnapKVCache.defaults, "alpha": 0.2}

    def layer_extra(self, layer_idx: int) -> dict[str, Any]:
        return {**super().layer_extra(layer_idx), "padding_slots": padding_slots(self.layers[layer_idx])}

    def unpadded_kv_bytes(self) -> int:
        """kv_bytes() less the padding slots (keys, values and position of each)."""
        total = self.kv_bytes()
        for layer in self.layers:
            if layer.is_initialized:
                slot = 2 * layer.keys.shape[-1] * layer.keys.element_size() + layer.pos.element_size()
                total -= padding_slots(layer) * slot
        return total

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "kv_bytes_unpadded": self.unpadded_kv_bytes()}
