"""ARKV: tri-state (Original / Quantized / Evicted) KV cache, read next to shared/ARKV.md.

Prefill (section 1): each layer takes the attention A of the last W queries, computes its
OQ score from A' (window queries x non-window keys), and, if over budget, keeps the
`cache_size - W` best tokens by the heavy-hitter score s (section 2) plus the window.
Nothing is quantized at prefill (the paper's behaviour).

The ratio r_l = OQ_l / max_j OQ_j needs every layer's OQ, so the cache assigns the
Original budgets origin_l = round(r_l * (cache_size - W)) when the next forward starts.

Decoding (section 3): whenever a layer holds more than `cache_size` tokens, the current
queries score the evictable tokens; the top `cache_size - W` stay, the rest are evicted.
Of the kept tokens still at full precision, the top origin_l stay Original and the others
are quantized to FP8 (a quantized token never goes back). The window is always Original.

`slack` (default 0, the paper's rule) lets an eviction free that many extra slots, so that
rescoring and eviction happen every slack + 1 steps; the budget still holds after every step.

Storage: Original tokens in the base class's store; Quantized ones as FP8 codes with one
float32 scale per token and head, with their positions. Attention sees both merged in
position order (section 4).
"""

from __future__ import annotations

from typing import Any

import torch

from arkv_bench.cache.adakv import HEAD_BUDGETS, HeadBudgets
from arkv_bench.cache.base import BenchCache, TokenLayer, gather_slots, sorted_selection, tensor_bytes
from arkv_bench.cache.quantize import fp8_dequantize, fp8_quantize
from arkv_bench.cache.scoring import POOLINGS, heavy_hitter_score, oq_ratios, oq_score

PAPER = {"tau1": 7.7744, "tau2": 5.4070, "tau3": 5.5277, "gamma": 263.81, "pooling": "avg", "kernel_size": 5}


class ArkvLayer(HeadBudgets, TokenLayer):
    """One layer of ARKV: Original store [B, H, n_o, D] + FP8 Quantized store [B, H, n_q, D].

    `head_budget="adaptive"` splits the kept (Original + Quantized) set between heads as AdaKV does
    (adakv.py); each head's Original budget stays origin_l."""

    quantize = True

    def __init__(self, layer_idx: int, cache_size: int, window_size: int = 32, tau1: float = PAPER["tau1"],
                 tau2: float = PAPER["tau2"], tau3: float = PAPER["tau3"], gamma: float = PAPER["gamma"],
                 pooling: str = "avg", kernel_size: int = 5, head_budget: str = "uniform", alpha: float = 0.2,
                 slack: int = 0, **_: Any):
        super().__init__(layer_idx, cache_size, window_size, slack)
        self.head_budget, self.alpha = head_budget, alpha
        self.tau = (tau1, tau2, tau3)
        self.gamma, self.pooling, self.kernel_size = gamma, pooling, kernel_size
        self.oq: torch.Tensor | None = None  # [B] OQ score per row, from prefill
        self.ratio: torch.Tensor | None = None  # [B] OQ_l / max_j OQ_j
        self.origin_budget: torch.Tensor | None = None  # [B] Original tokens outside the window
        self.origin_range = (0, 0)  # (min, max) of origin_budget over rows: the stores' fixed capacities
        self.kq = self.vq = self.k_scale = self.v_scale = self.pos_q = None
        self._order: torch.Tensor | None = None  # merge order of [Original, Quantized] slots, during attention

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.kq, self.k_scale = fp8_quantize(key_states[:, :, :0])
        self.vq, self.v_scale = fp8_quantize(value_states[:, :, :0])
        self.pos_q = self.pos.clone()

    # --- the merged view -------------------------------------------------------------------
    def _all_positions(self) -> torch.Tensor:
        return torch.cat([self.pos, self.pos_q], dim=2)

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pos_q.shape[-1] == 0:
            self._order = None
            return self.keys, self.values
        keys = torch.cat([self.keys, fp8_dequantize(self.kq, self.k_scale, self.dtype)], dim=2)
        values = torch.cat([self.values, fp8_dequantize(self.vq, self.v_scale, self.dtype)], dim=2)
        self._order = self._all_positions().argsort(dim=-1)
        return gather_slots(keys, self._order), gather_slots(values, self._order)

    def view_positions(self) -> torch.Tensor:
        pos = self._all_positions()
        return pos if self._order is None else pos.gather(2, self._order)

    def held_slots(self) -> int:
        return 0 if self.pos is None else self.pos.shape[-1] + self.pos_q.shape[-1]

    def may_hold_empty(self) -> bool:
        """Stores are sized to the largest row's budget: rows with smaller Original budgets, adaptive
        heads and padded rows leave empty slots."""
        return self.padded or self.head_budget == "adaptive" or self.origin_range[0] != self.origin_range[1]

    # --- scoring and compression -----------------------------------------------------------
    def after_attention(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        prefill = self.oq is None
        if not prefill and not self.over_budget():
            return
        n_scoring = min(self.window_size, query.shape[2]) if prefill else query.shape[2]
        a = self.probs(query, key, scaling, first=query.shape[2] - n_scoring)
        n_evictable = key.shape[2] - min(self.window_size, self.seen)
        a = a[..., :max(n_evictable, 0)]
        if prefill:
            self.oq = oq_score(a, *self.tau)
        if self.over_budget():
            score = heavy_hitter_score(a, self.gamma, self.pooling, self.kernel_size, key.shape[1])
            self.compress(self._to_storage_order(score), quantize=self.quantize and not prefill)
        self._order = None

    def _to_storage_order(self, score: torch.Tensor) -> torch.Tensor:
        """Scores of the evictable view slots -> scores of [Original, Quantized] slots (others -inf)."""
        b, h, n = self.pos.shape[0], self.pos.shape[1], self.held_slots()
        full = score.new_full((b, h, n), float("-inf"))
        order = self._order if self._order is not None else torch.arange(n, device=score.device).expand(b, h, n)
        return full.scatter(2, order[..., :score.shape[-1]], score)

    def compress(self, score: torch.Tensor, quantize: bool) -> None:
        """Keep the `cache_size` best slots; quantize Original ones beyond this layer's Original budget."""
        pos_all = self._all_positions()
        n_o = self.pos.shape[-1]
        keep = self.keep_best(score, pos_all)
        if not (quantize and self.origin_budget is not None):  # eviction only (the quantized store is empty)
            self.keep(keep[..., :n_o], self.budget_capacity(n_o))
            return
        in_orig = torch.arange(pos_all.shape[-1], device=pos_all.device) < n_o
        candidates = keep & in_orig & ~self.protected(pos_all)
        rank = score.masked_fill(~candidates, float("-inf")).argsort(dim=-1, descending=True).argsort(dim=-1)
        to_quant = candidates & (rank >= self.origin_budget.view(-1, 1, 1))
        self._requantize(torch.cat([keep[..., n_o:], to_quant[..., :n_o]], dim=2))
        capacity = self.budget_capacity(n_o)
        if capacity is not None:  # uniform heads: the window plus the largest Original budget
            capacity = min(capacity, self.window_size + self.origin_range[1])
        self.keep((keep & ~to_quant)[..., :n_o], capacity)

    def _requantize(self, select: torch.Tensor) -> None:
        """New Quantized store: the selected slots of [Quantized store, Original store (quantized now)]."""
        new_kq, new_ks = fp8_quantize(self.keys)
        new_vq, new_vs = fp8_quantize(self.values)
        pos = torch.cat([self.pos_q, self.pos], dim=2)
        capacity = None if self.head_budget == "adaptive" else max(
            self.cache_size - self.slack - self.window_size - self.origin_range[0], 0)
        idx, valid = sorted_selection(select, pos, capacity)
        self.kq = gather_slots(torch.cat([self.kq, new_kq], dim=2), idx)
        self.vq = gather_slots(torch.cat([self.vq, new_vq], dim=2), idx)
        self.k_scale = gather_slots(torch.cat([self.k_scale, new_ks], dim=2), idx)
        self.v_scale = gather_slots(torch.cat([self.v_scale, new_vs], dim=2), idx)
        self.pos_q = torch.where(valid, pos.gather(2, idx), -1)

    # --- accounting --------------------------------------------------------------------------
    def nbytes(self) -> int:
        return super().nbytes() + tensor_bytes(self.kq, self.vq, self.k_scale, self.v_scale, self.pos_q, self.oq,
                                              self.ratio, self.origin_budget)

    def quantized_count(self) -> float:
        return self.live(self.pos_q).float().sum(-1).mean().item() if self.start is not None else 0.0


class ArkvCache(BenchCache):
    """`mix`: ARKV with the paper's hyper-parameters by default."""

    method = "mix"
    layer_class = ArkvLayer
    defaults = {"cache_size": 1024, "window_size": 32, **PAPER, "head_budget": "uniform", "alpha": 0.2, "slack": 0}
    choices = {"pooling": POOLINGS, "head_budget": HEAD_BUDGETS}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx == 0:
            self._assign_origin_budgets()
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def _assign_origin_budgets(self) -> None:
        """Once every layer has its OQ score: r_l = OQ_l / max over ALL layers, origin_l = round(r_l (C - W))."""
        layers = self.layers
        if layers[0].origin_budget is not None or any(layer.oq is None for layer in layers):
            return
        ratios = oq_ratios(torch.stack([layer.oq for layer in layers]))
        for layer, ratio in zip(layers, ratios):
            layer.ratio = ratio
            layer.origin_budget = torch.round(ratio * (layer.cache_size - layer.window_size)).long()
            layer.origin_range = (int(layer.origin_budget.min()), int(layer.origin_budget.max()))  # one sync, once

    def layer_extra(self, layer_idx: int) -> dict[str, Any]:
        layer = self.layers[layer_idx]
        return {"oq_score": None if layer.oq is None else layer.oq.mean().item(),
                "oq_ratio": None if layer.ratio is None else layer.ratio.mean().item()}


class OriginLayer(ArkvLayer):
    """ARKV's scoring, eviction only."""

    quantize = False


class OriginCache(ArkvCache):
    """`origin`: ARKV's scoring with eviction only; every kept token stays at full precision."""

    method = "origin"
    layer_class = OriginLayer
