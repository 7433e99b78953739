"""AKV: a three-tier KV cache. Hot (full precision) and warm (int4) on the model's device,
cold (int2) in CPU memory; tokens move between tiers by a running importance score.

Tiers, per layer and KV head (every head holds the same number of tokens in each tier):

| tier | stored as | where | size |
| --- | --- | --- | --- |
| hot | the model's dtype | model's device | `hot_budget` tokens, always including the first `n_anchors` and the last `window_size` |
| warm | int4, group-quantized | model's device | `warm_budget` tokens |
| cold | int2, group-quantized | CPU memory | every other token (`cold_budget` bounds it: then the least important are evicted) |

Quantization is per token: each group of `group_size` channels of a key or a value gets an
asymmetric min/max scale and zero point (float32); codes are packed into bytes. Tokens
move one at a time, so a per-channel (KIVI-style) key grouping over tokens would not do.
A token promoted from cold or warm keeps the values it had there (precision lost by a
demotion is not regained). A token that stays warm keeps its codes; one demoted again is
re-quantized from its dequantized values, which lie on its old min/max grid (the int2
levels are int4 levels too), so back and forth adds at most the model dtype's rounding.

Importance, per token and KV head, updated after every forward:

    imp = decay * imp + attention_weight * a + recency_weight * exp(-age / window_size)

`a` is the attention the token receives from the forward's queries (the last
`window_size` queries at prefill, the new token's query while decoding), averaged over
those queries and over the query heads of the KV group; `age` is how many tokens came
after it. Defaults: decay 0.9 (a memory of about ten steps), attention_weight 1.0,
recency_weight 0.01. Summed over the steps, the bonus of a token that has just left the
window is about 0.09, while an average token among N gets about 10 / N from attention and a
heavy hitter (a ~ 0.1) about 1: recent tokens outrank average ones for a few windows, never
the tokens attention really uses. (With 0.1 the tiers degenerate into recency order.)

`kernel_size` > 1 pools `a` over neighbouring positions first (`pooling` "max" or "avg"),
as SnapKV does, so that a needle of several tokens (a 5-digit pass key) moves as a whole.
The default, 1, is the plain per-token score above. On the embedded SmolLM2-135M, 2K-token
passkey, hot 128 + warm 128: kernel 1 loses the key at depths 10/50/90%, kernel 7 (max)
keeps it at 10% and 50% (as SnapKV at cache_size 256 does).

Hot and warm tokens are attended every step, so their `a` is known every step. Cold
tokens are scored every `promote_interval` decoding steps (default 16): the step's
queries are copied to the CPU and meet the cold keys (dequantized from int2) there; the
attention weights are normalised over all tokens, attended and cold (the log-sum-exp of
the attended logits comes over from the device), i.e. `a` is the weight the token would
get if it were attended. A cold token's importance is then caught up for the steps it was
not scored, as if it had received the same `a` at each: `imp = decay^s imp + (1 + decay +
... + decay^(s-1)) (attention_weight a + recency_weight r)`, which puts it on the same
scale as the tokens scored every step.

After each update the tiers are rebalanced by rank: the anchors and the window first,
then by importance: the best `hot_budget` tokens are hot, the next `warm_budget` warm, the
rest cold. Candidates are the hot and warm tokens, plus, on a cold-scoring step, the
`hot_budget + warm_budget` most important cold tokens. So demotion (hot -> warm -> cold)
happens when a tier is over budget, and promotion when a warm or cold token's importance
rises above a token of the tier above. The recent tokens kept hot are the last `protect_recent`
(by default `window_size`, the window the scores are taken over).
Attention runs over hot + warm (promoted tokens included); nothing is lost unless
`cold_budget` is set: every token ever seen is in exactly one tier.

`demotion="fifo"` is the baseline the importance policy is compared against: the same
tiers and anchors, ranked by age instead of importance, so the oldest non-anchor hot
token is the next one demoted to warm, the oldest warm token the next one to go cold,
and, with a `cold_budget`, the oldest cold token the next one evicted. Nothing is ever
promoted, and no scores are computed (importances stay 0).

Accounting: `kv_bytes()` is what the device tiers hold (hot and warm values, scales,
positions, importances); `host_bytes()` is the cold tier, in CPU memory. When the model
itself runs on the CPU the tiers share that memory, and the split is still by tier.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from arkv_bench.cache.attention import repeat_kv
from arkv_bench.cache.base import BenchCache, TokenLayer, gather_slots, sorted_selection, tensor_bytes
from arkv_bench.cache.quantize import INT_BITS, int_dequantize, int_quantize, pack, unpack
from arkv_bench.cache.scoring import POOLINGS, heavy_hitter_score

HOST = torch.device("cpu")
HOT, WARM, COLD = 0, 1, 2
DEMOTIONS = ("importance", "fifo")
CODES = ("k", "k_scale", "k_zero", "v", "v_scale", "v_zero")


# --- per-token group quantization of a tier --------------------------------------------------

def quantize_tokens(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, H, m, D] -> packed codes [B, H, m, D * bits / 8], scale and zero [B, H, m, D / group]."""
    b, h, m, d = x.shape
    codes, scale, zero = int_quantize(x.reshape(b, h, m, d // group, group), bits, dim=4)
    return pack(codes.view(b, h, m, d), bits), scale.squeeze(4), zero.squeeze(4)


def dequantize_tokens(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `quantize_tokens`."""
    c = unpack(codes, bits)
    b, h, m, d = c.shape
    return int_dequantize(c.view(b, h, m, d // group, group), scale.unsqueeze(4), zero.unsqueeze(4), dtype
                          ).view(b, h, m, d)


def make_tier(keys: torch.Tensor, values: torch.Tensor, bits: int, group: int, **meta: torch.Tensor
              ) -> dict[str, torch.Tensor]:
    """A quantized tier: key and value codes, scales, zero points, plus per-token metadata (pos, imp, ...)."""
    k, k_scale, k_zero = quantize_tokens(keys, bits, group)
    v, v_scale, v_zero = quantize_tokens(values, bits, group)
    return dict(zip(CODES, (k, k_scale, k_zero, v, v_scale, v_zero)), **meta)


def tier_kv(tier: dict[str, torch.Tensor], bits: int, group: int, dtype: torch.dtype
            ) -> tuple[torch.Tensor, torch.Tensor]:
    return (dequantize_tokens(tier["k"], tier["k_scale"], tier["k_zero"], bits, group, dtype),
            dequantize_tokens(tier["v"], tier["v_scale"], tier["v_zero"], bits, group, dtype))


def take(tier: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tier's slots idx [B, H, m] (every tensor of the tier, along the token dimension)."""
    return {name: gather_slots(t, idx) for name, t in tier.items()}


def join(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: torch.cat([t, second[name].to(t.device)], dim=2) for name, t in first.items()}


def move(tier: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: t.to(device) for name, t in tier.items()}


def tier_size(tier: dict[str, torch.Tensor]) -> int:
    return tier["pos"].shape[-1]


def catch_up(decay: float, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(decay^s, 1 + decay + ... + decay^(s-1)) for s steps without a score."""
    s = steps.float()
    kept = decay ** s
    return kept, (1 - kept) / (1 - decay) if decay < 1 else s


class AKVLayer(TokenLayer):
    """Hot tier in the base class's store (keys, values, pos) plus `imp`; `warm` and `cold` are dicts of
    tensors (codes, scales, zero points, `pos`, `imp`; cold also `stamp`, the step its `imp` was last updated)."""

    def __init__(self, layer_idx: int, window_size: int = 32, hot_budget: int = 1024, warm_budget: int = 2048,
                 cold_budget: float = math.inf, n_anchors: int = 16, warm_bits: int = 4, cold_bits: int = 2,
                 group_size: int = 32, decay: float = 0.9, attention_weight: float = 1.0,
                 recency_weight: float = 0.01, promote_interval: int = 16, pooling: str = "max",
                 kernel_size: int = 1, demotion: str = "importance", protect_recent: int | None = None, **_: Any):
        super().__init__(layer_idx, None, window_size)
        self.hot_budget, self.warm_budget, self.cold_budget = hot_budget, warm_budget, cold_budget
        self.n_anchors, self.warm_bits, self.cold_bits, self.group = n_anchors, warm_bits, cold_bits, group_size
        self.decay, self.attention_weight, self.recency_weight = decay, attention_weight, recency_weight
        self.promote_interval, self.pooling, self.kernel_size = promote_interval, pooling, kernel_size
        self.demotion = demotion
        self.protect_recent = window_size if protect_recent is None else protect_recent
        self.imp = self.warm = self.cold = None
        self.steps = self.promotions = self.demotions = self.evictions = 0
        self._view_values: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.shape[-1] % self.group:
            raise ValueError(f"akv: group_size {self.group} must divide the head dimension {key_states.shape[-1]}")
        super().lazy_initialization(key_states, value_states)
        self.imp = torch.zeros(self.pos.shape, dtype=torch.float32, device=self.device)
        self.warm = make_tier(self.keys, self.values, self.warm_bits, self.group, pos=self.pos, imp=self.imp)
        self.cold = move(make_tier(self.keys, self.values, self.cold_bits, self.group, pos=self.pos, imp=self.imp,
                                   stamp=self.pos), HOST)

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().append(key_states, value_states)
        fresh = torch.zeros(*key_states.shape[:3], dtype=torch.float32, device=self.device)
        self.imp = torch.cat([self.imp, fresh], dim=2)

    # --- what attention sees: hot + warm -----------------------------------------------------
    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        if tier_size(self.warm) == 0:
            keys, values = self.keys, self.values
        else:
            warm_k, warm_v = tier_kv(self.warm, self.warm_bits, self.group, self.dtype)
            keys, values = torch.cat([self.keys, warm_k], dim=2), torch.cat([self.values, warm_v], dim=2)
        self._view_values = values
        return keys, values

    def view_positions(self) -> torch.Tensor:
        return torch.cat([self.pos, self.warm["pos"]], dim=2) if tier_size(self.warm) else self.pos

    def protected(self, pos: torch.Tensor) -> torch.Tensor:
        """The last `protect_recent` tokens, always hot."""
        return pos >= self.seen - self.protect_recent

    def rank_key(self, imp: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """What orders tokens between tiers (higher stays in the faster tier): importance, or youth for FIFO."""
        return imp if self.demotion == "importance" else pos.float()

    # --- scoring -------------------------------------------------------------------------------
    def recency(self, pos: torch.Tensor) -> torch.Tensor:
        return torch.exp(-(self.seen - 1 - pos).float() / self.window_size)

    def cold_logits(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Logits [B, Hq, q, N_cold] of the queries over the cold keys, on the CPU (dead slots -inf)."""
        keys = dequantize_tokens(self.cold["k"], self.cold["k_scale"], self.cold["k_zero"], self.cold_bits,
                                 self.group, torch.float32)
        b, hq, n_q, d = query.shape
        h, n = keys.shape[1], keys.shape[2]
        q = query.detach().to(HOST, torch.float32).reshape(b, h, hq // h * n_q, d)  # a KV head's query heads in a row
        logits = (torch.matmul(q, keys.transpose(-1, -2)) * scaling).view(b, h, hq // h, n_q, n)
        dead = self.cold["pos"] < self.start.to(HOST).view(-1, 1, 1)
        return logits.masked_fill(dead.view(b, h, 1, 1, n), float("-inf")).view(b, hq, n_q, n)

    def after_attention(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        self.steps += 1
        if self.demotion == "fifo":  # age alone decides: nothing to score
            self._rebalance(key, torch.cat([self.imp, self.warm["imp"]], dim=2), with_cold=False)
            self._view_values = None
            return
        n_q = query.shape[2]
        first = n_q - min(self.window_size, n_q) if self.steps == 1 else 0
        pos = self.view_positions()
        allowed = self.allowed(pos, n_q, first).repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        logits = torch.matmul(query[:, :, first:].float(), repeat_kv(key, query.shape[1] // key.shape[1]
                                                                      ).float().transpose(-1, -2)) * scaling
        logits = logits.masked_fill(~allowed, float("-inf"))
        lse = logits.logsumexp(dim=-1, keepdim=True)
        scoring_cold = self.steps > 1 and tier_size(self.cold) > 0 and (self.steps - 1) % self.promote_interval == 0
        if scoring_cold:
            cold_logits = self.cold_logits(query[:, :, first:], scaling)
            lse = torch.logaddexp(lse, cold_logits.logsumexp(dim=-1, keepdim=True).to(lse.device))
            self._update_cold(self._received(cold_logits, lse.to(HOST), self.cold["pos"]))
        received = self._received(logits, lse, pos)
        imp = torch.cat([self.imp, self.warm["imp"]], dim=2)
        imp = self.decay * imp + self.attention_weight * received + self.recency_weight * self.recency(pos)
        self._rebalance(key, imp, with_cold=scoring_cold)
        self._view_values = None

    def _received(self, logits: torch.Tensor, lse: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Attention weights [B, Hq, q, N] (normalised by lse) -> mean over queries and each group's heads [B, H, N],
        pooled over neighbouring positions when `kernel_size` > 1."""
        a = torch.exp(logits - lse).nan_to_num(0.0).mean(dim=2)
        b, hq, n = a.shape
        a = a.view(b, pos.shape[1], hq // pos.shape[1], n).mean(dim=2)
        if self.kernel_size == 1:
            return a
        order = pos.argsort(dim=-1)  # tiers are not kept in position order: pool in position order
        pooled = heavy_hitter_score(a.gather(2, order).unsqueeze(2), 0.0, self.pooling, self.kernel_size, pos.shape[1])
        return torch.empty_like(a).scatter_(2, order, pooled)

    def _update_cold(self, received: torch.Tensor) -> None:
        kept, gained = catch_up(self.decay, self.steps - self.cold["stamp"])
        bonus = self.attention_weight * received + self.recency_weight * self.recency(self.cold["pos"])
        self.cold["imp"] = kept * self.cold["imp"] + gained * bonus
        self.cold["stamp"] = torch.full_like(self.cold["stamp"], self.steps)

    # --- moving tokens between tiers -------------------------------------------------------------
    def _rebalance(self, keys: torch.Tensor, imp: torch.Tensor, with_cold: bool) -> None:
        """Rank the candidates (hot, warm, and on a cold-scoring step the best cold tokens) and refill the tiers."""
        n_hot, n_warm = self.pos.shape[-1], tier_size(self.warm)
        pos, values = self.view_positions(), self._view_values
        source = torch.cat([torch.full((n_hot,), HOT), torch.full((n_warm,), WARM)]).to(self.device)
        cold_idx = None
        if with_cold:
            live_imp = self.cold["imp"].masked_fill(self.cold["pos"] < self.start.to(HOST).view(-1, 1, 1),
                                                    float("-inf"))
            cold_idx = live_imp.topk(min(tier_size(self.cold), self.hot_budget + self.warm_budget), dim=-1).indices
            best = take(self.cold, cold_idx)
            best_k, best_v = tier_kv(best, self.cold_bits, self.group, self.dtype)
            keys, values = (torch.cat([x, y.to(self.device)], dim=2) for x, y in ((keys, best_k), (values, best_v)))
            pos, imp = torch.cat([pos, best["pos"].to(self.device)], 2), torch.cat([imp, best["imp"].to(self.device)], 2)
            source = torch.cat([source, torch.full((cold_idx.shape[-1],), COLD, device=self.device)])
        n_pool = pos.shape[-1]
        if n_pool <= self.hot_budget and n_warm == 0 and not with_cold:
            self.imp = imp
            return
        live = self.live(pos)
        forced = live & (self.protected(pos) | (pos - self.start.view(-1, 1, 1) < self.n_anchors))
        rank = self.rank_key(imp, pos).masked_fill(forced, float("inf")).masked_fill(~live, float("-inf"))
        order = rank.argsort(dim=-1, descending=True, stable=True)
        hot_n = min(self.hot_budget, n_pool)
        warm_n = min(self.warm_budget, n_pool - hot_n)
        to_hot, to_warm, to_cold = order[..., :hot_n], order[..., hot_n:hot_n + warm_n], order[..., hot_n + warm_n:]
        came_from = source[order]
        self.promotions += int((came_from[..., :hot_n] > HOT).sum() + (came_from[..., hot_n:hot_n + warm_n] > WARM).sum())
        self.demotions += int((came_from[..., hot_n:] == HOT).sum() + (came_from[..., hot_n + warm_n:] == WARM).sum())
        new_warm = self._warm_from(keys, values, pos, imp, to_warm, came_from[..., hot_n:hot_n + warm_n], n_hot)
        self._to_cold(keys, values, pos, imp, to_cold, came_from[..., hot_n + warm_n:], cold_idx, to_hot, to_warm,
                      n_hot + n_warm)
        self.keys, self.values = gather_slots(keys, to_hot), gather_slots(values, to_hot)
        self.pos, self.imp, self.warm = pos.gather(2, to_hot), imp.gather(2, to_hot), new_warm
        self.dense = False
        self.triggered = self.triggered or n_pool > hot_n

    def _warm_from(self, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor, imp: torch.Tensor,
                   idx: torch.Tensor, came_from: torch.Tensor, n_hot: int) -> dict[str, torch.Tensor]:
        """The new warm tier: tokens already warm keep their codes, others are quantized to int4."""
        fresh = make_tier(gather_slots(keys, idx), gather_slots(values, idx), self.warm_bits, self.group,
                          pos=pos.gather(2, idx), imp=imp.gather(2, idx))
        if tier_size(self.warm) == 0:
            return fresh
        stayed = came_from == WARM
        old = take(self.warm, (idx - n_hot).clamp(0, tier_size(self.warm) - 1))
        return {name: torch.where(stayed.view(*stayed.shape, *[1] * (t.dim() - 3)), old[name], t) if name in CODES
                else t for name, t in fresh.items()}

    def _to_cold(self, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor, imp: torch.Tensor,
                 idx: torch.Tensor, came_from: torch.Tensor, cold_idx: torch.Tensor | None, to_hot: torch.Tensor,
                 to_warm: torch.Tensor, n_attended: int) -> None:
        """Demoted tokens join the cold tier (int2, CPU); promoted cold tokens leave it."""
        if idx.shape[-1] == 0 and cold_idx is None:
            return
        demoted = move(make_tier(gather_slots(keys, idx), gather_slots(values, idx), self.cold_bits, self.group,
                                 pos=pos.gather(2, idx), imp=imp.gather(2, idx),
                                 stamp=torch.full_like(pos.gather(2, idx), self.steps)), HOST)
        if cold_idx is None:  # no cold token could move: the demoted ones are appended
            self.cold = join(self.cold, demoted)
        else:
            promoted = torch.cat([to_hot, to_warm], dim=2) - n_attended  # pool slots of cold candidates: >= 0
            slots = cold_idx.gather(2, promoted.clamp(0, cold_idx.shape[-1] - 1).to(HOST))
            gone = torch.zeros(self.cold["pos"].shape, dtype=torch.int32).scatter_add_(
                2, slots, (promoted >= 0).to(HOST, torch.int32))
            keep = torch.cat([gone == 0, (came_from < COLD).to(HOST)], dim=2)
            merged = join(self.cold, demoted)
            self.cold = take(merged, sorted_selection(keep, merged["pos"], tier_size(self.cold) - cold_idx.shape[-1]
                                                      + idx.shape[-1])[0])
        self._bound_cold()

    def _bound_cold(self) -> None:
        """With a finite `cold_budget`, evict the least important cold tokens beyond it."""
        over = tier_size(self.cold) - self.cold_budget
        if over <= 0:
            return
        live_imp = self.rank_key(self.cold["imp"], self.cold["pos"]).masked_fill(
            self.cold["pos"] < self.start.to(HOST).view(-1, 1, 1), float("-inf"))
        best = live_imp.topk(int(self.cold_budget), dim=-1).indices
        self.evictions += int(over) * best.shape[0] * best.shape[1]
        self.cold = take(self.cold, best.sort(dim=-1).values)

    # --- accounting ------------------------------------------------------------------------------
    def tier_counts(self) -> dict[str, float]:
        """Live tokens per tier, averaged over rows and heads."""
        if self.start is None:
            return {"hot": float(self.seen), "warm": 0.0, "cold": 0.0}
        cold_live = self.cold["pos"] >= self.start.to(HOST).view(-1, 1, 1)
        return {"hot": self.live(self.pos).float().sum(-1).mean().item(),
                "warm": self.live(self.warm["pos"]).float().sum(-1).mean().item(),
                "cold": cold_live.float().sum(-1).mean().item()}

    def quantized_count(self) -> float:
        counts = self.tier_counts()
        return counts["warm"] + counts["cold"]

    def tier_bytes(self) -> dict[str, int]:
        if not self.is_initialized:
            return {"hot": 0, "warm": 0, "cold": 0}
        return {"hot": tensor_bytes(self.keys, self.values, self.pos, self.imp, self.start),
                "warm": tensor_bytes(*self.warm.values()), "cold": tensor_bytes(*self.cold.values())}

    def nbytes(self) -> int:
        """Device bytes: the hot and warm tiers."""
        tiers = self.tier_bytes()
        return tiers["hot"] + tiers["warm"]

    def host_nbytes(self) -> int:
        """CPU bytes: the cold tier."""
        return self.tier_bytes()["cold"]


class AKVCache(BenchCache):
    """`akv`: no single `cache_size`; the device holds at most `hot_budget + warm_budget` tokens per layer."""

    method = "akv"
    layer_class = AKVLayer
    budgeted = False
    defaults = {"cache_size": None, "window_size": 32, "hot_budget": 1024, "warm_budget": 2048,
                "cold_budget": math.inf, "n_anchors": 16, "warm_bits": 4, "cold_bits": 2, "group_size": 32,
                "decay": 0.9, "attention_weight": 1.0, "recency_weight": 0.01, "promote_interval": 16,
                "pooling": "max", "kernel_size": 1, "demotion": "importance", "protect_recent": None}
    choices = {"warm_bits": INT_BITS, "cold_bits": INT_BITS, "pooling": POOLINGS, "demotion": DEMOTIONS}

    def host_bytes(self) -> int:
        return sum(layer.host_nbytes() for layer in self.layers)

    def layer_extra(self, layer_idx: int) -> dict[str, Any]:
        layer = self.layers[layer_idx]
        return {**layer.tier_counts(), **{f"{tier}_bytes": n for tier, n in layer.tier_bytes().items()},
                "promotions": layer.promotions, "demotions": layer.demotions, "evictions": layer.evictions}

    def stats(self) -> dict[str, Any]:
        stats = super().stats()
        totals = {key: sum(layer[key] for layer in stats["layers"])
                  for key in ("hot_bytes", "warm_bytes", "cold_bytes", "promotions", "demotions", "evictions")}
        return {**stats, "cpu_bytes": self.host_bytes(), **totals}
