"""`kivi`: KIVI-style uniform quantization, nothing evicted.

Keys are quantized per channel (each channel's min/max over a group of `group_size`
tokens), values per token (min/max over groups of `group_size` channels), asymmetric,
`bits` = 2 or 4, codes packed into bytes. The newest tokens stay at full precision in a
residual of at most `residual_length`; whenever it overflows, its oldest whole groups of
`group_size` tokens are quantized.
"""

from __future__ import annotations

from typing import Any

import torch

from arkv_bench.cache.base import BenchCache, TokenLayer, tensor_bytes
from arkv_bench.cache.quantize import INT_BITS, int_dequantize, int_quantize, pack, unpack


class KiviLayer(TokenLayer):
    """Packed key codes [B, H, n_q, D*bits/8] with scale/zero [B, H, n_q/G, D]; packed value codes
    with scale/zero [B, H, n_q, D/G]; then the full-precision residual. Dense, in order."""

    def __init__(self, layer_idx: int, bits: int = 4, group_size: int = 32, residual_length: int = 128, **kw: Any):
        super().__init__(layer_idx, **kw)
        self.bits, self.group, self.residual = bits, group_size, residual_length
        self.quantized: dict[str, torch.Tensor] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        head_dim = key_states.shape[-1]
        if head_dim % self.group:
            raise ValueError(f"kivi: group_size {self.group} must divide the head dimension {head_dim}")
        super().lazy_initialization(key_states, value_states)

    def _quantize(self, keys: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
        b, h, m, d = keys.shape
        g = self.group
        kc, ks, kz = int_quantize(keys.view(b, h, m // g, g, d), self.bits, dim=3)
        vc, vs, vz = int_quantize(values.view(b, h, m, d // g, g), self.bits, dim=4)
        return {"k": pack(kc.view(b, h, m, d), self.bits), "k_scale": ks.squeeze(3), "k_zero": kz.squeeze(3),
                "v": pack(vc.view(b, h, m, d), self.bits), "v_scale": vs.squeeze(4), "v_zero": vz.squeeze(4)}

    def _dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        q, g = self.quantized, self.group
        kc = unpack(q["k"], self.bits)
        b, h, m, d = kc.shape
        keys = int_dequantize(kc.view(b, h, m // g, g, d), q["k_scale"].unsqueeze(3), q["k_zero"].unsqueeze(3),
                              self.dtype).view(b, h, m, d)
        vc = unpack(q["v"], self.bits).view(b, h, m, d // g, g)
        values = int_dequantize(vc, q["v_scale"].unsqueeze(4), q["v_zero"].unsqueeze(4), self.dtype).view(b, h, m, d)
        return keys, values

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.quantized is None:
            return self.keys, self.values
        keys, values = self._dequantize()
        return torch.cat([keys, self.keys], dim=2), torch.cat([values, self.values], dim=2)

    def n_quantized(self) -> int:
        return 0 if self.quantized is None else self.quantized["k"].shape[2]

    def held_slots(self) -> int:
        return 0 if self.pos is None else self.n_quantized() + self.keys.shape[2]

    def after_attention(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        overflow = self.keys.shape[2] - self.residual
        if overflow <= 0:
            return
        n_move = -(-overflow // self.group) * self.group
        fresh = self._quantize(self.keys[:, :, :n_move], self.values[:, :, :n_move])
        self.quantized = fresh if self.quantized is None else {
            name: torch.cat([self.quantized[name], t], dim=2) for name, t in fresh.items()}
        self.keys, self.values, self.pos = (t[:, :, n_move:] for t in (self.keys, self.values, self.pos))
        self.triggered = True

    def nbytes(self) -> int:
        return super().nbytes() + tensor_bytes(*(self.quantized or {}).values())

    def quantized_count(self) -> float:
        return (self.n_quantized() - self.start.float()).clamp_min(0).mean().item() if self.start is not None else 0.0


class KiviCache(BenchCache):
    method = "kivi"
    layer_class = KiviLayer
    budgeted = False
    defaults = {"cache_size": None, "window_size": 32, "bits": 4, "group_size": 32, "residual_length": 128}
    choices = {"bits": INT_BITS}
