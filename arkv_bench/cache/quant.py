"""`quant`: uniform per-token FP8 (the ARKV reference's quantizer) for every token outside the
recent window; nothing is evicted.

On the slot store: the last `window_size` tokens sit in W + 1 Original slots; the Quantized
slot of token p is slot p (the store is sized for the prompt plus the tokens still to come).
Each step writes the new token into the free Original slot and quantizes only the one token
that leaves the window."""

from __future__ import annotations

import torch

from arkv_bench.cache.base import BenchCache
from arkv_bench.cache.quantize import fp8_quantize
from arkv_bench.cache.store import GROW, SlotLayer, empty_like_slots, scatter_slots, take_slots


class FP8Layer(SlotLayer):
    """FP8 slots [B, H, C_q, D] (+ a float32 scale per token) and W + 1 Original slots."""

    decode_evicts = False
    n_moving = 0  # tokens leaving the window in this forward (host-side plan)

    def end_prefill(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        n = self.pos.shape[-1]
        n_move = max(n - self.window_size, 0)
        capacity = n + (self.reserve or GROW)
        self.kq = empty_like_slots(self.keys[:, :, :0].to(torch.float8_e4m3fn), capacity)
        self.vq = empty_like_slots(self.kq, capacity)
        self.k_scale = torch.ones(*self.pos.shape[:2], capacity, 1, device=self.pos.device)
        self.v_scale = torch.ones_like(self.k_scale)
        slots = torch.arange(capacity, dtype=torch.int32, device=self.pos.device)
        self.pos_q = torch.where(slots < n_move, slots, -1).expand(*self.pos.shape[:2], capacity).contiguous()
        if n_move:
            for r in range(self.pos.shape[0]):  # a row at a time: float32 temporaries of one row, not the batch's
                self.kq[r, :, :n_move], self.k_scale[r, :, :n_move] = fp8_quantize(self.keys[r, :, :n_move])
                self.vq[r, :, :n_move], self.v_scale[r, :, :n_move] = fp8_quantize(self.values[r, :, :n_move])
            self.triggered = True
        self.build_store(self.pos >= n_move, self.window_size + 1)

    def moving(self, q: int) -> int:
        """Tokens that leave the window in a forward of q tokens."""
        return max(self.held + q - self.window_size, 0)

    def plan(self, q: int) -> tuple | None:
        if not self.stored or self.original_room() < q or self.seen + q - self.window_size > self.pos_q.shape[-1]:
            return None
        return (q, self.moving(q))

    def make_room(self, q: int) -> None:
        super().make_room(q)
        missing = self.seen + q - self.window_size - self.pos_q.shape[-1]
        if missing > 0:
            extra = missing + (0 if self.reserve else GROW)
            slots = torch.arange(self.pos_q.shape[-1], self.pos_q.shape[-1] + extra, dtype=torch.int32,
                                 device=self.pos_q.device)
            self.kq = torch.cat([self.kq, empty_like_slots(self.kq, extra)], dim=2)
            self.vq = torch.cat([self.vq, empty_like_slots(self.vq, extra)], dim=2)
            self.k_scale = torch.cat([self.k_scale, empty_like_slots(self.k_scale, extra, 1.0)], dim=2)
            self.v_scale = torch.cat([self.v_scale, empty_like_slots(self.v_scale, extra, 1.0)], dim=2)
            self.pos_q = torch.cat([self.pos_q, torch.full_like(slots, -1).expand(*self.pos_q.shape[:2], extra)], dim=2)
            self.epoch += 1

    def advance(self, q: int) -> None:
        self.n_moving = self.moving(q)
        self.seen += q
        self.held = min(self.held + q, self.window_size)

    def needs_probs(self) -> bool:
        return False  # nothing is scored

    def after_decode(self, query: torch.Tensor, probs: torch.Tensor | None) -> None:
        if not self.n_moving:
            return
        b, h = self.pos.shape[:2]
        dst = self.seen_t - self.window_size - self.n_moving + torch.arange(self.n_moving, device=self.pos.device,
                                                                             dtype=torch.int32)
        match = self.pos.unsqueeze(-1) == dst  # [B, H, C_o, m]
        src = match.int().argmax(dim=2)  # the Original slot of each leaving token
        found = match.any(dim=2)  # False for a padding position (its slot was emptied at prefill)
        dst = dst.long().expand(b, h, -1)
        codes, scale = fp8_quantize(take_slots(self.keys, src))
        scatter_slots(self.kq_bytes, dst, codes)
        scatter_slots(self.k_scale, dst, scale)
        codes, scale = fp8_quantize(take_slots(self.values, src))
        scatter_slots(self.vq_bytes, dst, codes)
        scatter_slots(self.v_scale, dst, scale)
        scatter_slots(self.pos_q, dst, torch.where(found, self.pos.gather(2, src), -1))
        scatter_slots(self.pos, src, torch.where(found, -1, self.pos.gather(2, src)))


class FP8Cache(BenchCache):
    method = "quant"
    layer_class = FP8Layer
    budgeted = False
    defaults = {"cache_size": None, "window_size": 32}
