"""What the decode-attention kernels read: one layer's slots, as they are stored.

A layer is a list of `Segment`s. Each holds `C` slots per (row, KV head) with a position
tensor beside them (`pos` [B, Hkv, C] int32, -1 = empty) and keys and values stored as `Codes`:

| codes | `data` | `scale` / `zero` |
| --- | --- | --- |
| model dtype (bits 16) | [B, Hkv, C, D] bf16/fp16 | none |
| FP8 e4m3 (bits 8) | [B, Hkv, C, D] float8_e4m3fn | float32 scale [B, Hkv, C] or [B, Hkv, C, 1]; no zero |
| int4 / int2 | [B, Hkv, C, D * bits / 8] uint8, `pack`ed | [B, Hkv, C / tg, D / cg] each, float32 or float16 |

An integer code's scale and zero point are shared by a block of `tg` slots x `cg` channels,
read off the scale's shape: KIVI's keys (per channel, over groups of G slots) have tg = G,
cg = 1; KIVI's values and AKV's tiers (per slot, over groups of G channels) tg = 1, cg = G.
Dequantized, a value is `code * scale + zero` computed in float32 (from 16-bit scales and zeros too:
KIVI's store of a bf16/fp16 model), rounded to the model's dtype, exactly as `quantize.fp8_dequantize` /
`int_dequantize` do, so the kernel sees what today's caches attend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from arkv_bench.cache.quantize import FP8_DTYPE, INT_BITS, unpack

MODEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SCALE_DTYPES = (torch.float32, torch.float16)  # int codes' scales and zeros (float16: KIVI in a bf16/fp16 model)


@dataclass(frozen=True)
class Codes:
    """Keys or values of a segment, as stored (see the module docstring for the shapes)."""

    data: torch.Tensor
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    bits: int = 16

    def __post_init__(self) -> None:
        if self.data.dim() != 4:
            raise ValueError(f"codes must be [B, H, C, D], got shape {tuple(self.data.shape)}")
        expected = {16: MODEL_DTYPES, 8: (FP8_DTYPE,), **{b: (torch.uint8,) for b in INT_BITS}}
        if self.bits not in expected or self.data.dtype not in expected[self.bits]:
            raise ValueError(f"codes of {self.bits} bits cannot be stored as {self.data.dtype}")
        if self.bits != 16 and self.scale is None:
            raise ValueError(f"{self.bits}-bit codes need a scale")
        if self.bits in INT_BITS and self.zero is None:
            raise ValueError(f"int{self.bits} codes need a zero point")
        if self.bits in INT_BITS and {self.scale.dtype, self.zero.dtype} - set(SCALE_DTYPES):
            raise ValueError(f"int{self.bits} scales and zero points are float32 or float16, got {self.scale.dtype}"
                             f" and {self.zero.dtype}")
        if self.scale is not None:
            tg, cg = self.groups
            if tg * self.scale.shape[2] != self.slots or cg * self.scale.shape[3] != self.head_dim:
                raise ValueError(f"scale shape {tuple(self.scale.shape)} does not tile codes of {self.slots} slots"
                                 f" x {self.head_dim} channels")

    @property
    def slots(self) -> int:
        return self.data.shape[2]

    @property
    def head_dim(self) -> int:
        return self.data.shape[3] * 8 // self.bits if self.bits in INT_BITS else self.data.shape[3]

    @property
    def groups(self) -> tuple[int, int]:
        """(slots, channels) sharing one scale and zero point."""
        if self.scale is None:
            return 1, 1
        return max(self.slots // max(self.scale.shape[2], 1), 1), self.head_dim // self.scale.shape[3]

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """[B, H, C, D] in `dtype` (the reference path; the kernel never builds this)."""
        if self.bits == 16:
            return self.data.to(dtype)
        codes = unpack(self.data, self.bits) if self.bits in INT_BITS else self.data
        b, h, c, d = codes.shape
        tg, cg = self.groups
        blocks = codes.float().view(b, h, c // tg, tg, d // cg, cg)
        x = blocks * self.scale.float().view(b, h, c // tg, 1, d // cg, 1)
        if self.zero is not None:
            x = x + self.zero.float().view(b, h, c // tg, 1, d // cg, 1)
        return x.view(b, h, c, d).to(dtype)


@dataclass(frozen=True)
class Segment:
    """Slots of one storage format: keys, values and each slot's true position (-1 = empty)."""

    keys: Codes
    values: Codes
    pos: torch.Tensor

    def __post_init__(self) -> None:
        b, h, c = self.pos.shape
        for side in (self.keys, self.values):
            if tuple(side.data.shape[:3]) != (b, h, c):
                raise ValueError(f"codes {tuple(side.data.shape)} do not match positions {tuple(self.pos.shape)}")
        if self.keys.head_dim != self.values.head_dim:
            raise ValueError(f"keys have {self.keys.head_dim} channels, values {self.values.head_dim}")
        if self.pos.dtype != torch.int32:
            raise ValueError(f"positions must be int32, got {self.pos.dtype}")

    @property
    def slots(self) -> int:
        return self.pos.shape[2]


def _per_slot(scale: torch.Tensor) -> torch.Tensor:
    return scale.unsqueeze(-1) if scale.dim() == 3 else scale


def original(keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor) -> Segment:
    """Slots at the model's precision."""
    return Segment(Codes(keys), Codes(values), pos)


def fp8(keys: torch.Tensor, key_scale: torch.Tensor, values: torch.Tensor, value_scale: torch.Tensor,
        pos: torch.Tensor) -> Segment:
    """FP8 e4m3 slots with one float32 scale per slot and head ([B, H, C] or [B, H, C, 1])."""
    return Segment(Codes(keys, _per_slot(key_scale), bits=8), Codes(values, _per_slot(value_scale), bits=8), pos)


def packed_int(quantized: dict[str, torch.Tensor], pos: torch.Tensor, bits: int) -> Segment:
    """KIVI's quantized store or an AKV tier: a dict with packed `k`, `v` and their `_scale`, `_zero`."""
    return Segment(Codes(quantized["k"], quantized["k_scale"], quantized["k_zero"], bits),
                   Codes(quantized["v"], quantized["v_scale"], quantized["v_zero"], bits), pos)
