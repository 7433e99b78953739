"""Quantizers for cached keys and values.

Two formats:

- FP8 e4m3 with one scale per token (per head), as in the ARKV reference: the token's
  largest magnitude maps to 448, the largest finite e4m3 value.
- Asymmetric integer (2 or 4 bits) with a scale and a zero point per group, as KIVI:
  codes are packed several to a byte, so 4-bit costs half a byte per value.

Scales and zero points are computed in float32, which keeps the round-trip error within the
format's own bound; KIVI stores its integer ones in float16 for a bf16/fp16 model (`kivi.scale_dtype`),
and dequantization computes in float32 from whichever is stored.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
INT_BITS = (2, 4)


def fp8_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token FP8: returns (codes [..., D] e4m3, scale [..., 1] float32)."""
    scale = x.detach().abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12) / FP8_MAX
    codes = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return codes, scale


def fp8_dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `fp8_quantize`, in the model's dtype."""
    return (codes.float() * scale).to(dtype)


def int_quantize(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization over `dim` (the group).

    Returns uint8 codes (unpacked, same shape as x), and float32 scale and zero point with
    `dim` kept as size 1. Round-to-nearest makes the error at most scale / 2.
    """
    if bits not in INT_BITS:
        raise ValueError(f"bits must be one of {INT_BITS}, got {bits}")
    xf = x.float()
    lo = xf.amin(dim=dim, keepdim=True)
    hi = xf.amax(dim=dim, keepdim=True)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-8)
    codes = ((xf - lo) / scale).round().clamp(0, 2**bits - 1).to(torch.uint8)
    return codes, scale, lo


def int_dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `int_quantize` (codes unpacked), in float32 from float32 or 16-bit scale and zero."""
    return (codes.float() * scale.float() + zero.float()).to(dtype)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack `8 // bits` codes per byte along the last dimension (which must divide evenly)."""
    per = 8 // bits
    if codes.shape[-1] % per:
        raise ValueError(f"last dimension {codes.shape[-1]} is not a multiple of {per}")
    grouped = codes.view(*codes.shape[:-1], codes.shape[-1] // per, per).to(torch.int32)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    return (grouped << shifts).sum(dim=-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack`."""
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & (2**bits - 1)
    return codes.view(*packed.shape[:-1], packed.shape[-1] * per).to(torch.uint8)
