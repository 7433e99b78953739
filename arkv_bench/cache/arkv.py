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

Storage (store.py): Original slots in the model's dtype and Quantized slots as FP8 codes
with one float32 scale per token and head, each with its positions. Attention runs over both
at once (section 4: the order of keys does not matter, their RoPE positions are the true
ones). The first quantization event moves many tokens at once and sizes the Quantized store: its
forward only scores, and the rebuild runs on the host before anything reads the stores again
(`settle`), so that forward has fixed shapes too. After it, each event evicts in place and
quantizes only the (at most slack + 1) tokens that fall out of the Original budget. Every decode
step can therefore be replayed from a CUDA graph.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from arkv_bench.cache.adakv import HEAD_BUDGETS, HeadBudgets
from arkv_bench.cache.base import BenchCache
from arkv_bench.cache.quantize import fp8_quantize
from arkv_bench.cache.scoring import POOLINGS, heavy_hitter_score, oq_ratios, oq_score
from arkv_bench.cache.store import (SlotLayer, compact_index, lowest, pooled_score, quantize_into, rank_by_position,
                                    take_or_empty, take_slots)

PAPER = {"tau1": 7.7744, "tau2": 5.4070, "tau3": 5.5277, "gamma": 263.81, "pooling": "avg", "kernel_size": 5}


class ArkvLayer(HeadBudgets, SlotLayer):
    """One layer of ARKV on the slot store: Original slots + FP8 Quantized slots.

    `head_budget="adaptive"` splits the kept (Original + Quantized) set between heads as AdaKV does
    (adakv.py); each head's Original budget stays origin_l. Its events run eagerly."""

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
        self.origin_range = (0, 0)  # (min, max) of origin_budget over rows: they size the stores
        self.quantizing = False  # the Quantized store exists: events run in place
        self.held_o = 0  # Original slots in use per (row, head) once quantizing, an upper bound
        self.first_score: torch.Tensor | None = None  # the first quantization event's score, until settle()

    # --- prefill (sections 1 and 2) ------------------------------------------------------------
    def end_prefill(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        first = query.shape[2] - min(self.window_size, query.shape[2])
        n_keys = max(key.shape[2] - min(self.window_size, self.seen), 0)  # A': non-window keys
        over = self.over_budget()
        oq, scores = [], []
        for rows in self.row_blocks(query, key, first):
            a = self.probs(query, key, scaling, first=first, rows=rows)[..., :n_keys]
            oq.append(oq_score(a, *self.tau))
            if over:
                scores.append(heavy_hitter_score(a, self.gamma, self.pooling, self.kernel_size, key.shape[1]))
        self.oq = torch.cat(oq)
        keep = self.live(self.pos)
        if over:
            s = torch.cat(scores)
            keep = self.keep_best(F.pad(s, (0, self.pos.shape[-1] - s.shape[-1]), value=float("-inf")), self.pos)
        self.build_store(keep)

    # --- decoding (section 3) --------------------------------------------------------------------
    def decode_score(self, probs: torch.Tensor) -> torch.Tensor:
        """s of every slot from this step's queries, pooled in position order; the window scores 0. Max
        pooling makes exact ties: the earlier token wins them, wherever it is stored."""
        pos = self.all_positions()
        score = pooled_score(probs, pos, self.protected_t(pos), self.gamma, self.pooling, self.kernel_size)
        return rank_by_position(score, pos) if self.pooling == "max" else score

    def plan(self, q: int) -> tuple | None:
        if self.quantize and not self.quantizing and self.will_evict(q) and not self.defers_first_event(q):
            return None  # a quantization event that reallocates the stores inside the forward: eager
        return super().plan(q)

    def defers_first_event(self, q: int) -> bool:
        """Whether the first quantization event of a forward of q tokens leaves its rebuild to `settle`: then
        the forward itself has fixed shapes (it scores, nothing moves) and may be replayed from a graph."""
        return self.origin_budget is not None and self.head_budget == "uniform" and q == 1

    def settle(self) -> None:
        """The first quantization event's rebuild, on the host, before anything else reads the stores: it
        moves what the event's forward scored exactly as if it had run at the end of that forward."""
        if self.first_score is not None:
            score, self.first_score = self.first_score, None
            self.rebuild(score)

    def held_original(self) -> int:
        return self.held_o if self.quantizing else super().held_original()

    def advance(self, q: int) -> None:
        super().advance(q)
        if self.quantizing:
            self.held_o = self.window_size + self.origin_range[1] if self.evicting else self.held_o + q

    def needs_probs(self) -> bool:
        return self.evicting  # scores only when it evicts

    def after_decode(self, query: torch.Tensor, probs: torch.Tensor | None) -> None:
        if not self.evicting:
            return
        score = self.decode_score(probs)
        if not self.quantize or self.origin_budget is None:
            self.evict(score, query.shape[2])
        elif self.quantizing and self.head_budget == "uniform" and query.shape[2] == 1:
            evicted = self.evict(score, 1)
            self.requantize(score, evicted)
        elif not self.quantizing and self.defers_first_event(query.shape[2]):
            self.first_score = score  # settle() rebuilds the stores before the next forward
        else:  # also after several tokens at once (a text fed in chunks, a question after its context):
            self.rebuild(score)  # more tokens than the in-place move handles can leave the Original budget

    def requantize(self, score: torch.Tensor, evicted: torch.Tensor) -> None:
        """In place: the lowest-scored Original tokens beyond origin_l (at most slack + 1) become Quantized."""
        n_o, m = self.pos.shape[-1], self.slack + 1
        candidates = self.live(self.pos) & ~self.protected_t(self.pos) & ~evicted[..., :n_o]
        n_move = (candidates.sum(dim=-1) - self.origin_budget.view(-1, 1)).clamp(0, m)
        src = lowest(score[..., :n_o].masked_fill(~candidates, float("inf")), m)
        move = torch.arange(m, device=src.device) < n_move.unsqueeze(-1)
        quantize_into(self, src, move)

    def rebuild(self, score: torch.Tensor) -> None:
        """The first quantization event (and every event with adaptive heads), eagerly: keep the best
        `cache_size - slack`, quantize the kept Original tokens beyond origin_l, and size the stores."""
        pos_all = self.all_positions()
        n_o = self.pos.shape[-1]
        keep = self.keep_best(score, pos_all)
        candidates = keep & ~self.protected(pos_all)
        candidates[..., n_o:] = False
        rank = score.masked_fill(~candidates, float("-inf")).argsort(dim=-1, descending=True).argsort(dim=-1)
        to_quant = (candidates & (rank >= self.origin_budget.view(-1, 1, 1)))[..., :n_o]
        m = self.slack + 1
        uniform = self.head_budget == "uniform"
        # Uniform heads: the stores' sizes follow from the budgets (no sync); adaptive heads count (syncs).
        room = self.cache_size - self.slack - self.window_size - self.origin_range[0]  # Quantized, at most
        moving = compact_index(to_quant, max(room, 0) if uniform else int(to_quant.sum(dim=-1).max()))
        codes_k, scale_k = fp8_quantize(take_slots(self.keys, moving.clamp_min(0)))
        codes_v, scale_v = fp8_quantize(take_slots(self.values, moving.clamp_min(0)))
        new_pos = torch.where(moving >= 0, self.pos.gather(2, moving.clamp_min(0)), -1)
        if self.pos_q is not None:
            old_pos = self.pos_q.masked_fill(~keep[..., n_o:], -1)
            codes_k, codes_v = torch.cat([self.kq, codes_k], dim=2), torch.cat([self.vq, codes_v], dim=2)
            scale_k, scale_v = torch.cat([self.k_scale, scale_k], dim=2), torch.cat([self.v_scale, scale_v], dim=2)
            new_pos = torch.cat([old_pos, new_pos], dim=2)
        cap_q = (max(room, 0) if uniform else int((new_pos >= 0).sum(dim=-1).max())) + m
        idx = compact_index(new_pos >= 0, cap_q)
        self.kq, self.vq = take_or_empty(codes_k, idx), take_or_empty(codes_v, idx)
        self.k_scale, self.v_scale = take_or_empty(scale_k, idx, 1.0), take_or_empty(scale_v, idx, 1.0)
        self.pos_q = take_or_empty(new_pos, idx, -1)
        stay = keep[..., :n_o] & ~to_quant
        cap_o = (self.window_size + self.origin_range[1] if uniform else int(stay.sum(dim=-1).max())) + m
        idx = compact_index(stay, cap_o)
        self.keys, self.values = take_or_empty(self.keys, idx), take_or_empty(self.values, idx)
        self.pos = take_or_empty(self.pos.masked_fill(~stay, -1), idx, -1)
        self.quantizing, self.held_o, self.triggered = True, cap_o - m, True
        self.epoch += 1


class ArkvCache(BenchCache):
    """`mix`: ARKV with the paper's hyper-parameters by default."""

    method = "mix"
    layer_class = ArkvLayer
    defaults = {"cache_size": 1024, "window_size": 32, **PAPER, "head_budget": "uniform", "alpha": 0.2, "slack": 0}
    choices = {"pooling": POOLINGS, "head_budget": HEAD_BUDGETS}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx == 0 and self.layer_class.quantize:
            self._assign_origin_budgets()
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def plan(self, q: int) -> tuple | None:
        if self.layer_class.quantize:
            self._assign_origin_budgets()  # on the host before the forward (one sync, once), not inside it
            if self.layers[0].origin_budget is None:
                return None
        return super().plan(q)

    def _assign_origin_budgets(self) -> None:
        """Once every layer has its OQ score: r_l = OQ_l / max over ALL layers, origin_l = round(r_l (C - W))."""
        layers = self.layers
        if layers[0].origin_budget is not None or any(layer.oq is None for layer in layers):
            return
        here = layers[0].oq.device  # under --device-map the layers live on several devices
        ratios = oq_ratios(torch.stack([layer.oq.to(here) for layer in layers]))
        for layer, ratio in zip(layers, ratios):
            layer.ratio = ratio.to(layer.oq.device)
            layer.origin_budget = torch.round(layer.ratio * (layer.cache_size - layer.window_size)).long()
        ranges = torch.stack([torch.stack([layer.origin_budget.min(), layer.origin_budget.max()]).to(here)
                              for layer in layers])
        for layer, (low, high) in zip(layers, ranges.tolist()):  # one sync, once
            layer.origin_range = (low, high)

    def layer_extra(self, layer_idx: int) -> dict[str, Any]:
        self._assign_origin_budgets()  # `origin` has no use for the budgets while decoding: its ratios come here
        layer = self.layers[layer_idx]
        return {"oq_score": None if layer.oq is None else layer.oq.mean().item(),
                "oq_ratio": None if layer.ratio is None else layer.ratio.mean().item()}


class OriginLayer(ArkvLayer):
    """ARKV's scoring, eviction only."""

    quantize = False


class OriginCache(ArkvCache):
    """`origin`: ARKV's scoring with eviction only; every kept token stays at full precision. Its decode
    steps need no Original budgets (so none is eager for them): the OQ ratios are assigned for the stats."""

    method = "origin"
    layer_class = OriginLayer
