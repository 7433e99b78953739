"""Decode attention over a layer's slots as they are stored (model dtype, FP8, packed int4/int2).

    out, weights = decode_attention(query, segments, start, scaling, query_pos=None, return_weights=False)

`query` [B, Hq, T, D] (T = 1 while decoding, a few for a chunk); `segments` the layer's slots
(see `segments.py`); `start` [B] int32, each row's first real position; `query_pos` [B, T] or
[T] int32, the queries' positions (None: every live slot is in the past, as in a decode step).
One softmax spans all segments. `weights`, when asked for, is one float32 tensor [B, Hkv, C]
per segment: each slot's attention weight averaged over the T queries and the query heads of
its KV group (what the scoring methods read), from the same pass.

`backend`: "torch" (the reference; any device, any dtype), "triton" (bf16/fp16 on CUDA, or on
the CPU under TRITON_INTERPRET=1; at most MAX_ROWS = 128 query rows G * T per KV head; a
power-of-two head dimension of at least 32 for int4 codes, 64 for int2), "auto" (triton where
it applies and is installed, else torch).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from arkv_bench.cache.kernels.reference import reference_attention
from arkv_bench.cache.kernels.segments import Codes, Segment, fp8, original, packed_int

from arkv_bench.options import ATTENTION_KERNELS as BACKENDS  # auto, triton, torch: one list
KERNEL_DTYPES = (torch.bfloat16, torch.float16)
MAX_ROWS = 128  # query heads per KV head x queries: one program holds them all in registers
__all__ = ["BACKENDS", "Codes", "Segment", "decode_attention", "fp8", "original", "packed_int", "resolve_backend"]


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.bfloat16, rows: int = 1,
                    head_dim: int = 128, bits: int = 16) -> str:
    """"triton" or "torch" for a query of this device and dtype with `rows` = G * T rows per KV head,
    over slots whose narrowest codes have `bits` bits.

    A bad name, or "triton" where the kernel does not apply, raises ValueError."""
    if backend not in BACKENDS:
        raise ValueError(f"attention kernel must be one of {', '.join(BACKENDS)}, got {backend!r}")
    # packed codes are split into 8 / bits dot products over head_dim * bits / 8 channels: 16 at least
    channels = head_dim * bits // 8 if bits < 8 else head_dim
    fits = dtype in KERNEL_DTYPES and rows <= MAX_ROWS and channels >= 16 and head_dim & (head_dim - 1) == 0
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"the triton kernel runs on CUDA (or under TRITON_INTERPRET=1), not on {device.type}: "
                         "use auto or torch")
    if backend == "triton" and not fits:
        raise ValueError(f"the triton kernel takes bf16/fp16 queries of at most {MAX_ROWS} rows per KV head and a "
                         f"power-of-two head dimension of at least 16 x 8 / bits, got {dtype}, {rows} rows, "
                         f"head dimension {head_dim}, {bits}-bit codes: use the torch backend")
    if backend != "auto":
        return backend
    usable = device.type == "cuda" and importlib.util.find_spec("triton") is not None
    return "triton" if usable and fits else "torch"


def decode_attention(query: torch.Tensor, segments: list[Segment], start: torch.Tensor, scaling: float,
                     query_pos: torch.Tensor | None = None, return_weights: bool = False, backend: str = "auto",
                     per_row: bool = False) -> tuple[torch.Tensor, list[torch.Tensor] | torch.Tensor | None]:
    """Attention output [B, Hq, T, D] (query's dtype) and, if asked, per-segment weights [B, Hkv, C]
    (or, `per_row`, every query's probabilities [B, Hq, T, N] over all the segments' slots, in order)."""
    if not segments:
        raise ValueError("decode_attention needs at least one segment")
    b, hq, t, d = query.shape
    hkv = segments[0].pos.shape[1]
    for seg in segments:
        if seg.pos.shape[:2] != (b, hkv) or seg.keys.head_dim != d:
            raise ValueError(f"segment of shape {tuple(seg.keys.data.shape)} does not fit query {tuple(query.shape)}")
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    if query_pos is not None:
        query_pos = query_pos.to(torch.int32).expand(b, t)
    bits = min(min(seg.keys.bits, seg.values.bits) for seg in segments)
    if resolve_backend(backend, query.device, query.dtype, hq // hkv * t, d, bits) == "torch":
        return reference_attention(query, segments, start, scaling, query_pos, return_weights, per_row)
    from arkv_bench.cache.kernels.triton_decode import triton_attention  # triton imports only when used

    return triton_attention(query, segments, start, scaling, query_pos, return_weights, per_row)
