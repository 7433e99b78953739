"""`kivi`: KIVI-style uniform quantization, nothing evicted.

Keys are quantized per channel (each channel's min/max over a group of `group_size` tokens), values
per token (min/max over groups of `group_size` channels), asymmetric, `bits` = 2 or 4, codes packed
into bytes. The newest tokens stay at full precision in a residual of at most `residual_length`;
whenever it overflows, its oldest whole groups of `group_size` tokens are quantized. Groups are
counted from the sequence's first position (left padding included): token p is in group p // G.

On the slot store: prefill is dense. At its end the layer allocates, once, a packed store whose slot
p holds token p (sized for the prompt plus the tokens still to come), quantizes the prompt's whole
groups into it and keeps the rest in `residual_length + 1` Original slots: between forwards the
residual holds at most `residual_length` tokens, and a decode step adds one. A step writes its token
into an empty residual slot, attends over both stores as they are stored (`decode_attention` reads
the packed codes, no dequantized copy on the Triton path) and, when the residual overflows, quantizes
its oldest whole groups in place, at positions read from the device count `quantized_t`. Whether a
step does is known on the host (`plan`), so steps with and without that flush replay from their own
CUDA graph.

Scales and zero points are computed in float32 and stored, as KIVI stores them, in float16 for a bf16 or
fp16 model (whose keys and values stay within float16's 65504 in practice; beyond it they would overflow)
and in float32 for a float32 model, whose results stay exact.
"""

from __future__ import annotations

from typing import Any

import torch

from arkv_bench.cache.base import BenchCache, tensor_bytes
from arkv_bench.cache.kernels import decode_attention, original, packed_int, resolve_backend
from arkv_bench.cache.quantize import INT_BITS, int_quantize, pack
from arkv_bench.cache.store import GROW, SlotLayer, fused, scatter_slots, take_or_empty, take_slots


def scale_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the packed store's scales and zero points for a model of `model_dtype`."""
    return torch.float16 if model_dtype in (torch.float16, torch.bfloat16) else torch.float32


class KiviLayer(SlotLayer):
    """The packed store `quantized`: codes "k", "v" [B, H, C_q, D*bits/8] (uint8), key scale/zero
    [B, H, C_q/G, D], value scale/zero [B, H, C_q, D/G] (`scale_dtype`), positions `pos_q` [B, H, C_q]
    (slot p holds token p; -1 until it is quantized). The residual is the Original store."""

    decode_evicts = False
    n_flush = 0  # tokens this forward moves from the residual to the packed store (host-side plan)

    def __init__(self, layer_idx: int, bits: int = 4, group_size: int = 32, residual_length: int = 128, **kw: Any):
        super().__init__(layer_idx, **kw)
        self.bits, self.group, self.residual = bits, group_size, residual_length
        self.quantized: dict[str, torch.Tensor] | None = None
        self.quantized_t: torch.Tensor | None = None  # tokens quantized so far, on the device (graph-safe)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        head_dim = key_states.shape[-1]
        if head_dim % self.group:
            raise ValueError(f"kivi: group_size {self.group} must divide the head dimension {head_dim}")
        super().lazy_initialization(key_states, value_states)

    def _quantize(self, keys: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Whole groups of tokens [B, H, m, D] (m a multiple of G) -> packed codes, and scales and zeros
        (computed in float32, stored in `scale_dtype`)."""
        b, h, m, d = keys.shape
        g, dtype = self.group, scale_dtype(keys.dtype)
        kc, ks, kz = int_quantize(keys.view(b, h, m // g, g, d), self.bits, dim=3)
        vc, vs, vz = int_quantize(values.view(b, h, m, d // g, g), self.bits, dim=4)
        return {"k": pack(kc.view(b, h, m, d), self.bits),
                "k_scale": ks.squeeze(3).to(dtype), "k_zero": kz.squeeze(3).to(dtype),
                "v": pack(vc.view(b, h, m, d), self.bits),
                "v_scale": vs.squeeze(4).to(dtype), "v_zero": vz.squeeze(4).to(dtype)}

    # --- how many tokens are quantized, known on the host --------------------------------------
    def overflow(self, held: int) -> int:
        """Tokens quantized out of a residual of `held`: the fewest whole groups that bring it back
        to `residual_length`."""
        return -(-max(held - self.residual, 0) // self.group) * self.group

    def quantized_after(self, q: int) -> int:
        """Packed slots in use after a forward of q tokens (nothing is evicted: seen - held are quantized)."""
        return self.seen - self.held + self.overflow(self.held + q)

    # --- the store ------------------------------------------------------------------------------
    def empty_store(self, capacity: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """A packed store of `capacity` empty slots (a multiple of G), zeros, and its positions (-1)."""
        b, h, _, d = self.keys.shape
        g, device = self.group, self.keys.device
        shapes = {"k": (capacity, d * self.bits // 8), "k_scale": (capacity // g, d), "k_zero": (capacity // g, d),
                  "v": (capacity, d * self.bits // 8), "v_scale": (capacity, d // g), "v_zero": (capacity, d // g)}
        scales = scale_dtype(self.keys.dtype)
        store = {name: torch.zeros(b, h, *shape, dtype=torch.uint8 if name in ("k", "v") else scales, device=device)
                 for name, shape in shapes.items()}
        return store, torch.full((b, h, capacity), -1, dtype=torch.int32, device=device)

    def end_prefill(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        """Quantize the prompt's whole groups that do not fit the residual (as many as a residual of the
        whole prompt would flush), keep the rest, left padding included (it is part of its group's
        scales once quantized), in the residual's slots; size both stores once."""
        b, h, n, _ = self.keys.shape
        n_q = self.overflow(n)
        self.quantized, self.pos_q = self.empty_store(max(self.overflow(n + (self.reserve or GROW)), self.group))
        if n_q:
            for r in range(b):  # a row at a time: float32 temporaries of one row, not the batch's
                rows = slice(r, r + 1)
                for name, codes in self._quantize(self.keys[rows, :, :n_q], self.values[rows, :, :n_q]).items():
                    self.quantized[name][rows, :, :codes.shape[2]] = codes
            self.pos_q[:, :, :n_q] = torch.arange(n_q, dtype=torch.int32, device=self.pos.device)
            self.triggered = True
        slots = torch.arange(n_q, n_q + self.residual + 1, device=self.pos.device)
        idx = torch.where(slots < n, slots, -1).expand(b, h, -1)
        self.keys, self.values = take_or_empty(self.keys, idx), take_or_empty(self.values, idx)
        self.pos = take_or_empty(self.pos, idx, -1)
        self.held = n - n_q
        self.quantized_t = torch.tensor(n_q, dtype=torch.int32, device=self.pos.device)
        self.seen_t = torch.tensor(self.seen, dtype=torch.int32, device=self.pos.device)
        self.stored, self.dense = True, False
        self.epoch += 1

    def plan(self, q: int) -> tuple | None:
        if not self.stored or self.original_room() < q or self.quantized_after(q) > self.pos_q.shape[-1]:
            return None
        return (q, self.overflow(self.held + q))

    def make_room(self, q: int) -> None:
        """Eager path: residual slots for q more tokens (before the flush), packed groups for the flush."""
        if self.original_room() < q:
            self.grow_original(q - self.original_room())
        missing = self.quantized_after(q) - self.pos_q.shape[-1]
        if missing > 0:
            extra = -(-(missing + (0 if self.reserve else GROW)) // self.group) * self.group
            more, more_pos = self.empty_store(extra)
            self.quantized = {name: torch.cat([t, more[name]], dim=2) for name, t in self.quantized.items()}
            self.pos_q = torch.cat([self.pos_q, more_pos], dim=2)
            self.epoch += 1

    def advance(self, q: int) -> None:
        self.n_flush = self.overflow(self.held + q)
        self.triggered = self.triggered or self.n_flush > 0
        self.seen += q
        self.held += q - self.n_flush

    def flush(self) -> None:
        """Quantize the residual's `n_flush` oldest tokens (whole groups from position `quantized_t` on)
        into the packed slots of their positions, in place; their residual slots become empty."""
        m, g = self.n_flush, self.group
        b, h = self.pos.shape[:2]
        ar = torch.arange(m, dtype=torch.int32, device=self.pos.device)
        moving = self.quantized_t + ar  # their positions, which are also their packed slots
        src = (self.pos.unsqueeze(-1) == moving).int().argmax(dim=2)  # [B, H, m]: their residual slots
        per_token = moving.long().expand(b, h, m)
        per_group = (self.quantized_t // g + ar[:m // g]).long().expand(b, h, m // g)
        for name, codes in self._quantize(take_slots(self.keys, src), take_slots(self.values, src)).items():
            scatter_slots(self.quantized[name], per_group if name in ("k_scale", "k_zero") else per_token, codes)
        scatter_slots(self.pos_q, per_token, moving.expand(b, h, m))
        scatter_slots(self.pos, src, torch.full_like(src, -1, dtype=self.pos.dtype))
        self.quantized_t.add_(m)

    # --- attention ------------------------------------------------------------------------------
    def attend(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        """Decode: one softmax over the packed store and the residual, read as stored; then the flush."""
        if not self.stored:
            return super().attend(module, query, key, value, attention_mask, **kwargs)
        self._awaiting_attention = False
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        q = query.shape[2]
        q_pos = None if q == 1 else self.query_positions(q)
        segments = [packed_int(self.quantized, self.pos_q, self.bits), original(self.keys, self.values, self.pos)]
        out, _ = decode_attention(query, segments, self.start, scaling, q_pos, backend=self.kernel_backend(query))
        if self.n_flush:
            fused(type(self).flush, self)
        return out.transpose(1, 2), None

    def kernel_backend(self, query: torch.Tensor) -> str:
        b, hq, q, d = query.shape
        return resolve_backend(self.attention_kernel, query.device, query.dtype, hq // self.keys.shape[1] * q, d,
                               self.bits)

    def nbytes(self) -> int:
        return super().nbytes() + tensor_bytes(*(self.quantized or {}).values())


class KiviCache(BenchCache):
    method = "kivi"
    layer_class = KiviLayer
    budgeted = False
    defaults = {"cache_size": None, "window_size": 32, "bits": 4, "group_size": 32, "residual_length": 128}
    choices = {"bits": INT_BITS}
