"""`quant`: uniform per-token FP8 (the ARKV reference's quantizer) for every token outside the
recent window; nothing is evicted. Attention sees the FP8 tokens dequantized, in order."""

from __future__ import annotations

import torch

from arkv_bench.cache.base import BenchCache, TokenLayer, tensor_bytes
from arkv_bench.cache.quantize import fp8_dequantize, fp8_quantize


class FP8Layer(TokenLayer):
    """FP8 store [B, H, n_q, D] + float32 scale per token (the oldest tokens), then the Original
    store (the last `window_size` tokens). Dense: every token seen is held, in order."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.kq, self.k_scale = fp8_quantize(key_states[:, :, :0])
        self.vq, self.v_scale = fp8_quantize(value_states[:, :, :0])

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kq.shape[2] == 0:
            return self.keys, self.values
        return (torch.cat([fp8_dequantize(self.kq, self.k_scale, self.dtype), self.keys], dim=2),
                torch.cat([fp8_dequantize(self.vq, self.v_scale, self.dtype), self.values], dim=2))

    def held_slots(self) -> int:
        return 0 if self.pos is None else self.kq.shape[2] + self.keys.shape[2]

    def after_attention(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        n_move = self.keys.shape[2] - self.window_size
        if n_move <= 0:
            return
        kq, ks = fp8_quantize(self.keys[:, :, :n_move])
        vq, vs = fp8_quantize(self.values[:, :, :n_move])
        self.kq, self.k_scale = torch.cat([self.kq, kq], dim=2), torch.cat([self.k_scale, ks], dim=2)
        self.vq, self.v_scale = torch.cat([self.vq, vq], dim=2), torch.cat([self.v_scale, vs], dim=2)
        self.keys, self.values, self.pos = (t[:, :, n_move:] for t in (self.keys, self.values, self.pos))
        self.triggered = True

    def nbytes(self) -> int:
        return super().nbytes() + tensor_bytes(self.kq, self.vq, self.k_scale, self.v_scale)

    def quantized_count(self) -> float:
        return (self.kq.shape[2] - self.start.float()).clamp_min(0).mean().item() if self.start is not None else 0.0


class FP8Cache(BenchCache):
    method = "quant"
    layer_class = FP8Layer
    budgeted = False
    defaults = {"cache_size": None, "window_size": 32}
