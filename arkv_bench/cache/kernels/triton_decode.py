"""Split-K decode attention in Triton that reads every segment as stored.

One launch per segment, then one or two for the whole call:

1. `_partials`, once per segment, grid (B * Hkv, splits): one program takes one KV head's
   G * T query rows (G query heads per KV head, T queries) against a range of slots, loads
   each tile of keys and values in its stored format, dequantizes it in registers to the
   query's dtype (the same rounding as the torch reference) and keeps an online softmax.
   It writes the range's running max, sum and unnormalised output; with weights on, also
   the tile's logits (float32, base 2, masked = -inf). The products are those of the model's
   dtype (the dequantized tile is rounded to it; see `_operand` for the interpreter).
2. `_combine`, grid (B * Hkv * G * T): merges the partials of every split of every segment
   into the output and the row's log-sum-exp, so the softmax spans all segments.
3. `_weights` (only with weights on): exp(logit - lse), averaged over the group's rows.

So the weights cost one extra read of G * T float32 logits per slot, never a second pass
over the keys.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from arkv_bench.cache.kernels.segments import Codes, Segment

LOG2E = 1.4426950408889634
# Launch settings per storage format (the narrower of keys and values): slots per tile, warps, pipeline
# stages, and whether the products are transposed (`_partials_t`). From `scripts/bench_kernel.py
# --sweep` on one H100 at b1 and b8 x 32K (Llama-3.1-8B shape): one warp a program wins for the
# quantized formats (no cross-warp softmax reductions or barriers; more programs on an SM hide the
# latency). The transposed products pad the query rows to 8, not 16 (half the tensor-core work and
# registers, no spills and a third less shared memory in the sm_90 compile) but have not been timed
# on a GPU yet: they are tested, and off. Then the programs per SM aimed at by the split-K plan and
# the fewest slots a split takes.
TILES = {"model": (128, 4, 2, False), "fp8": (64, 1, 3, False), "int": (32, 1, 3, False)}
WAVES = 16
MIN_SPLIT_SLOTS = 512
NEG = tl.constexpr(-1.0e30)  # finite "minus infinity" for running maxima: exp2(NEG - NEG) stays defined


@triton.jit
def _unpack(byte, BITS: tl.constexpr, DOT_F32: tl.constexpr):
    """The 8 / BITS codes of each byte (the first in the low bits) as four tensors of exact fp16
    values (float32 under the interpreter; for int4 the last two repeat the first two).

    On the GPU a code c becomes the fp16 whose bits are 0x6400 | c, that is 1024 + c, minus 1024:
    four bytes at a time, by byte permutes, with no integer-to-float conversion (those run at an
    eighth of the rate of arithmetic). The assembly is declared impure so that Triton keeps it
    (and the dequantization after it) on the tile as loaded, then moves the fp16 result into the
    dot's operand layout: hoisted into that layout, it would read the codes one byte at a time."""
    if DOT_F32:
        x = byte.to(tl.int32)
        m = (1 << BITS) - 1
        c0 = (x & m).to(tl.float32)
        c1 = ((x >> BITS) & m).to(tl.float32)
        if BITS == 4:
            return c0, c1, c0, c1
        return c0, c1, ((x >> 4) & m).to(tl.float32), ((x >> 6) & m).to(tl.float32)
    if BITS == 4:
        c0, c1 = tl.inline_asm_elementwise(
            """{
            .reg .b32 t, u, m, k;
            mov.b32 m, 0x64646464;
            mov.b32 k, 0x64006400;
            and.b32 t, $4, 0x0F0F0F0F;
            shr.b32 u, $4, 4;
            and.b32 u, u, 0x0F0F0F0F;
            prmt.b32 $0, t, m, 0x5140;
            prmt.b32 $1, t, m, 0x5342;
            prmt.b32 $2, u, m, 0x5140;
            prmt.b32 $3, u, m, 0x5342;
            sub.f16x2 $0, $0, k;
            sub.f16x2 $1, $1, k;
            sub.f16x2 $2, $2, k;
            sub.f16x2 $3, $3, k;
            }""", "=r,=r,=r,=r,r", [byte], dtype=(tl.float16, tl.float16), is_pure=False, pack=4)
        return c0, c1, c0, c1
    c0, c1, c2, c3 = tl.inline_asm_elementwise(
        """{
        .reg .b32 t, m, k;
        mov.b32 m, 0x64646464;
        mov.b32 k, 0x64006400;
        and.b32 t, $8, 0x03030303;
        prmt.b32 $0, t, m, 0x5140;
        prmt.b32 $1, t, m, 0x5342;
        shr.b32 t, $8, 2;
        and.b32 t, t, 0x03030303;
        prmt.b32 $2, t, m, 0x5140;
        prmt.b32 $3, t, m, 0x5342;
        shr.b32 t, $8, 4;
        and.b32 t, t, 0x03030303;
        prmt.b32 $4, t, m, 0x5140;
        prmt.b32 $5, t, m, 0x5342;
        shr.b32 t, $8, 6;
        and.b32 t, t, 0x03030303;
        prmt.b32 $6, t, m, 0x5140;
        prmt.b32 $7, t, m, 0x5342;
        sub.f16x2 $0, $0, k;
        sub.f16x2 $1, $1, k;
        sub.f16x2 $2, $2, k;
        sub.f16x2 $3, $3, k;
        sub.f16x2 $4, $4, k;
        sub.f16x2 $5, $5, k;
        sub.f16x2 $6, $6, k;
        sub.f16x2 $7, $7, k;
        }""", "=r,=r,=r,=r,=r,=r,=r,=r,r", [byte], dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
        is_pure=False, pack=4)
    return c0, c1, c2, c3


@triton.jit
def _scale(ptrs, mask, DOT_F32: tl.constexpr):
    """The scales or zero points at `ptrs` (0 where masked) as the fp16 the dequantization multiplies by
    (float32 of it under the interpreter); float32 ones are rounded here. A float16 one (KIVI's store of a
    bf16/fp16 model) is read as the 4-byte-aligned word that holds it (allocations start and end on such
    boundaries): loads of 2 bytes are not pipelined (cp.async moves 4 at least) and the tile loop waits on
    them, 281 us a KIVI int4 layer at b8 x 32K on an H200 against 233 us this way (224 with float32)."""
    if ptrs.dtype.element_ty == tl.float16 and not DOT_F32:
        addr = ptrs.to(tl.int64)
        word = tl.load((addr & -4).to(tl.pointer_type(tl.int32)), mask=mask, other=0)
        x = ((word >> ((addr & 2) * 8).to(tl.int32)) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
    else:
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float16)
    if DOT_F32:
        x = x.to(tl.float32)
    return x


@triton.jit
def _dequantize(c, s, z, DOT_F32: tl.constexpr):
    """code * scale + zero in one fp16 multiply-add (under the interpreter: exact in float32, then rounded)."""
    x = c * s + z
    if DOT_F32:
        x = x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def _int_tile(ptr, scale_ptr, zero_ptr, n0, hi, load_ok, stride_n, stride_d, s_stride_n, s_stride_d,
              BITS: tl.constexpr, TG: tl.constexpr, CG: tl.constexpr, HEAD_DIM: tl.constexpr,
              BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr):
    """Packed codes of slots n0.. (below hi), dequantized: four [BLOCK_N, HEAD_DIM / PER] tensors, the
    i-th holding channels PER * j + i (PER = 8 / BITS codes a byte; int4 repeats the first two).
    Slots where `load_ok` is false read code 0 (and, with their own scale, scale and zero 0).

    Each grouping the caches use loads only its distinct scales and broadcasts them over a third axis."""
    PER: tl.constexpr = 8 // BITS
    NB: tl.constexpr = HEAD_DIM // PER
    if TG == 1 and CG % PER == 0:  # per slot, groups of channels (KIVI's values, AKV): slots x groups x bytes
        NG: tl.constexpr = HEAD_DIM // CG
        CB: tl.constexpr = CG // PER
        n = n0 + tl.arange(0, BLOCK_N)
        g = tl.arange(0, NG)
        byte = tl.load(ptr + n[:, None, None] * stride_n + (g[None, :, None] * CB + tl.arange(0, CB)[None, None, :])
                       * stride_d, mask=load_ok[:, None, None], other=0)
        at = n[:, None] * s_stride_n + g[None, :] * s_stride_d
        s = _scale(scale_ptr + at, load_ok[:, None], DOT_F32)[:, :, None]
        z = _scale(zero_ptr + at, load_ok[:, None], DOT_F32)[:, :, None]
        c0, c1, c2, c3 = _unpack(byte, BITS, DOT_F32)
        x0 = tl.reshape(_dequantize(c0, s, z, DOT_F32), (BLOCK_N, NB))
        x1 = tl.reshape(_dequantize(c1, s, z, DOT_F32), (BLOCK_N, NB))
        if BITS == 2:
            x2 = tl.reshape(_dequantize(c2, s, z, DOT_F32), (BLOCK_N, NB))
            x3 = tl.reshape(_dequantize(c3, s, z, DOT_F32), (BLOCK_N, NB))
        else:
            x2, x3 = x0, x1
    else:
        j = tl.arange(0, NB)
        if CG == 1 and BLOCK_N % TG == 0 and TG < BLOCK_N:  # per channel, several slot groups a tile (on a group)
            NT: tl.constexpr = BLOCK_N // TG
            t = tl.arange(0, NT)
            r = tl.arange(0, TG)
            n3 = n0 + t[:, None, None] * TG + r[None, :, None]
            byte = tl.load(ptr + n3 * stride_n + j[None, None, :] * stride_d, mask=n3 < hi, other=0)
            at = (n0 // TG + t)[:, None] * s_stride_n + (j * PER)[None, :] * s_stride_d
            group_ok = (n0 + t * TG < hi)[:, None]
            s0 = _scale(scale_ptr + at, group_ok, DOT_F32)[:, None, :]
            z0 = _scale(zero_ptr + at, group_ok, DOT_F32)[:, None, :]
            s1 = _scale(scale_ptr + at + s_stride_d, group_ok, DOT_F32)[:, None, :]
            z1 = _scale(zero_ptr + at + s_stride_d, group_ok, DOT_F32)[:, None, :]
            if BITS == 2:
                s2 = _scale(scale_ptr + at + 2 * s_stride_d, group_ok, DOT_F32)[:, None, :]
                z2 = _scale(zero_ptr + at + 2 * s_stride_d, group_ok, DOT_F32)[:, None, :]
                s3 = _scale(scale_ptr + at + 3 * s_stride_d, group_ok, DOT_F32)[:, None, :]
                z3 = _scale(zero_ptr + at + 3 * s_stride_d, group_ok, DOT_F32)[:, None, :]
        else:
            n = n0 + tl.arange(0, BLOCK_N)
            byte = tl.load(ptr + n[:, None] * stride_n + j[None, :] * stride_d, mask=load_ok[:, None], other=0)
            if CG == 1 and TG % BLOCK_N == 0:  # per channel, one slot group a tile (KIVI's keys)
                at = (n0 // TG) * s_stride_n + (j * PER)[None, :] * s_stride_d
                ok = True
            else:  # any other grouping: gather each value's scale
                at = (n // TG)[:, None] * s_stride_n + ((j * PER) // CG)[None, :] * s_stride_d
                ok = (n < hi)[:, None]
            s0 = _scale(scale_ptr + at, ok, DOT_F32)
            z0 = _scale(zero_ptr + at, ok, DOT_F32)
            at1 = at + s_stride_d if CG == 1 else at + ((j * PER + 1) // CG - (j * PER) // CG)[None, :] * s_stride_d
            s1 = _scale(scale_ptr + at1, ok, DOT_F32)
            z1 = _scale(zero_ptr + at1, ok, DOT_F32)
            if BITS == 2:
                at2 = at + 2 * s_stride_d if CG == 1 else at + ((j * PER + 2) // CG - (j * PER) // CG)[None, :] * s_stride_d
                at3 = at + 3 * s_stride_d if CG == 1 else at + ((j * PER + 3) // CG - (j * PER) // CG)[None, :] * s_stride_d
                s2 = _scale(scale_ptr + at2, ok, DOT_F32)
                z2 = _scale(zero_ptr + at2, ok, DOT_F32)
                s3 = _scale(scale_ptr + at3, ok, DOT_F32)
                z3 = _scale(zero_ptr + at3, ok, DOT_F32)
        c0, c1, c2, c3 = _unpack(byte, BITS, DOT_F32)
        x0 = tl.reshape(_dequantize(c0, s0, z0, DOT_F32), (BLOCK_N, NB))
        x1 = tl.reshape(_dequantize(c1, s1, z1, DOT_F32), (BLOCK_N, NB))
        if BITS == 2:
            x2 = tl.reshape(_dequantize(c2, s2, z2, DOT_F32), (BLOCK_N, NB))
            x3 = tl.reshape(_dequantize(c3, s3, z3, DOT_F32), (BLOCK_N, NB))
        else:
            x2, x3 = x0, x1
    return x0, x1, x2, x3


@triton.jit
def _tile(ptr, n0, load_ok, stride_n, stride_d, BITS: tl.constexpr, HEAD_DIM: tl.constexpr,
          BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr):
    """Slots n0.. x all channels of one side stored in the model's dtype or as FP8 codes (exact in
    fp16; their per-slot scale goes on the logits / probabilities), as a dot operand."""
    n = n0 + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    x = tl.load(ptr + n[:, None] * stride_n + d[None, :] * stride_d, mask=load_ok[:, None], other=0.0)
    if DOT_F32:
        return x.to(tl.float32)
    if BITS == 8:  # e4m3 -> fp16, two at a time (not `.to`, which Triton would move into the operand's loads)
        x = tl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.rn.f16x2.e4m3x2 $0, lo; cvt.rn.f16x2.e4m3x2 $1, hi; }",
            "=r,=r,r", [x.to(tl.int8, bitcast=True)], dtype=tl.float16, is_pure=False, pack=4)
    return x


@triton.jit
def _operand(x, dtype, DOT_F32: tl.constexpr):
    """x rounded to `dtype`, as a dot operand: that dtype, or float32 under the interpreter
    (whose dot does not know bf16 and whose float32 -> bf16 cast truncates: round to nearest even here)."""
    if DOT_F32:
        x = x.to(tl.float32)
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True)
        return x.to(dtype).to(tl.float32)
    return x.to(dtype)


@triton.jit
def _query(q_ptr, b, h, rows, row_ok, q_sb, q_sr, i: tl.constexpr, PER: tl.constexpr, ROWS: tl.constexpr,
           HEAD_DIM: tl.constexpr):
    """The program's query rows at channels PER * j + i (all channels for PER 1)."""
    j = tl.arange(0, HEAD_DIM // PER)
    return tl.load(q_ptr + b * q_sb + (h * ROWS + rows)[:, None] * q_sr + (j * PER + i)[None, :],
                   mask=row_ok[:, None], other=0.0)


@triton.jit
def _queries(q_ptr, b, h, rows, row_ok, q_sb, q_sr, qk_scale, K_BITS: tl.constexpr, K_PER: tl.constexpr,
             ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_F32: tl.constexpr):
    """The program's query rows as dot operands, split into the K_PER channel sets of the keys' codes
    (four tensors; unused ones repeat the first), and the factor that turns their dot with the keys
    into base-2 logits. Against the model's dtype the query is kept as is; against FP8 or int codes
    (fp16 operands) it is multiplied by a power of two that puts its largest entry in [2^13, 2^14)."""
    q0 = _query(q_ptr, b, h, rows, row_ok, q_sb, q_sr, 0, K_PER, ROWS, HEAD_DIM)
    if K_BITS == 16:  # one return statement: Triton 3.6 compares the types of every return, taken or not
        q0 = _operand(q0, q0.dtype, DOT_F32)
        q1, q2, q3 = q0, q0, q0
        logit_scale = qk_scale
    else:
        full = _query(q_ptr, b, h, rows, row_ok, q_sb, q_sr, 0, 1, ROWS, HEAD_DIM).to(tl.float32)
        top = tl.max(tl.max(tl.abs(full), 1), 0)
        exponent = tl.minimum(tl.maximum((top.to(tl.int32, bitcast=True) >> 23) & 0xFF, 14), 240)
        factor = ((267 - exponent) << 23).to(tl.float32, bitcast=True)
        logit_scale = qk_scale * ((exponent - 13) << 23).to(tl.float32, bitcast=True)
        q0 = _operand(q0.to(tl.float32) * factor, tl.float16, DOT_F32)
        q1, q2, q3 = q0, q0, q0
        if K_PER > 1:
            q1 = _operand(_query(q_ptr, b, h, rows, row_ok, q_sb, q_sr, 1, K_PER, ROWS, HEAD_DIM).to(tl.float32)
                          * factor, tl.float16, DOT_F32)
        if K_PER == 4:
            q2 = _operand(_query(q_ptr, b, h, rows, row_ok, q_sb, q_sr, 2, K_PER, ROWS, HEAD_DIM).to(tl.float32)
                          * factor, tl.float16, DOT_F32)
            q3 = _operand(_query(q_ptr, b, h, rows, row_ok, q_sb, q_sr, 3, K_PER, ROWS, HEAD_DIM).to(tl.float32)
                          * factor, tl.float16, DOT_F32)
    return q0, q1, q2, q3, logit_scale


@triton.jit
def _v_top(vs_ptr, lo, hi, vs_sn, BLOCK_N: tl.constexpr):
    """The largest FP8 value scale of slots lo..hi (1 if none is positive and finite): the probabilities
    are multiplied by scale / top, which keeps them in fp16's range."""
    top = tl.full([BLOCK_N], 0.0, tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        top = tl.maximum(top, tl.load(vs_ptr + n * vs_sn, mask=n < hi, other=0.0))
    top = tl.max(top, 0)
    return tl.where((top > 0) & (top < float("inf")), top, 1.0)


@triton.jit
def _partials(q_ptr, k_ptr, ks_ptr, kz_ptr, v_ptr, vs_ptr, vz_ptr, pos_ptr, start_ptr, qpos_ptr,
              acc_ptr, m_ptr, l_ptr, logit_ptr,
              qk_scale, n_slots, per_split, split_offset, logit_offset, logit_len, n_splits_total,
              q_sb, q_sr, k_sb, k_sh, k_sn, k_sd, ks_sb, ks_sh, ks_sn, ks_sd,
              v_sb, v_sh, v_sn, v_sd, vs_sb, vs_sh, vs_sn, vs_sd, p_sb, p_sh, p_sn,
              HKV: tl.constexpr, ROWS: tl.constexpr, T: tl.constexpr, HEAD_DIM: tl.constexpr,
              BLOCK_M: tl.constexpr, PART_M: tl.constexpr, BLOCK_N: tl.constexpr,
              K_BITS: tl.constexpr, K_TG: tl.constexpr, K_CG: tl.constexpr,
              V_BITS: tl.constexpr, V_TG: tl.constexpr, V_CG: tl.constexpr,
              CAUSAL: tl.constexpr, WEIGHTS: tl.constexpr, DOT_F32: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < ROWS
    K_PER: tl.constexpr = 8 // K_BITS if K_BITS < 8 else 1
    V_PER: tl.constexpr = 8 // V_BITS if V_BITS < 8 else 1
    VNB: tl.constexpr = HEAD_DIM // V_PER
    q0, q1, q2, q3, logit_scale = _queries(q_ptr, b, h, rows, row_ok, q_sb, q_sr, qk_scale, K_BITS, K_PER, ROWS,
                                           HEAD_DIM, DOT_F32)
    dtype = q_ptr.dtype.element_ty
    p_dtype = dtype if V_BITS == 16 else tl.float16
    first = tl.load(start_ptr + b)
    if CAUSAL:
        q_pos = tl.load(qpos_ptr + b * T + rows % T, mask=row_ok, other=-1)
    k_base = k_ptr + b * k_sb + h * k_sh
    v_base = v_ptr + b * v_sb + h * v_sh
    ks_off = b * ks_sb + h * ks_sh
    vs_off = b * vs_sb + h * vs_sh
    m_i = tl.full([BLOCK_M], NEG, tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc0 = tl.full([BLOCK_M, VNB], 0.0, tl.float32)  # channels V_PER * j + i in acc_i
    acc1 = tl.full([BLOCK_M, VNB], 0.0, tl.float32)
    acc2 = tl.full([BLOCK_M, VNB], 0.0, tl.float32)
    acc3 = tl.full([BLOCK_M, VNB], 0.0, tl.float32)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, n_slots)
    v_top = 1.0
    if V_BITS == 8:
        v_top = _v_top(vs_ptr + vs_off, lo, hi, vs_sn, BLOCK_N)
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        in_range = n < hi
        pos = tl.load(pos_ptr + b * p_sb + h * p_sh + n * p_sn, mask=in_range, other=-1)
        live = in_range & (pos >= first)
        if K_BITS < 8:
            k0, k1, k2, k3 = _int_tile(k_base, ks_ptr + ks_off, kz_ptr + ks_off, n0, hi, in_range, k_sn, k_sd,
                                       ks_sn, ks_sd, K_BITS, K_TG, K_CG, HEAD_DIM, BLOCK_N, DOT_F32)
            s = tl.dot(q0, tl.trans(k0))
            s = tl.dot(q1, tl.trans(k1), s)
            if K_PER == 4:
                s = tl.dot(q2, tl.trans(k2), s)
                s = tl.dot(q3, tl.trans(k3), s)
        else:
            s = tl.dot(q0, tl.trans(_tile(k_base, n0, in_range, k_sn, k_sd, K_BITS, HEAD_DIM, BLOCK_N, DOT_F32)))
        if K_BITS == 8:  # FP8: the slot's scale on its logit
            s = s * (tl.load(ks_ptr + ks_off + n * ks_sn, mask=in_range, other=0.0) * logit_scale)[None, :]
        else:
            s = s * logit_scale
        allowed = live[None, :] & row_ok[:, None]
        if CAUSAL:
            allowed = allowed & (pos[None, :] <= q_pos[:, None])
        s = tl.where(allowed, s, float("-inf"))
        if WEIGHTS:
            w_ptr = logit_ptr + (bh * ROWS + rows)[:, None] * logit_len + logit_offset + n[None, :]
            tl.store(w_ptr, s, mask=row_ok[:, None] & in_range[None, :])
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if V_BITS < 8:
            v0, v1, v2, v3 = _int_tile(v_base, vs_ptr + vs_off, vz_ptr + vs_off, n0, hi, live, v_sn, v_sd,
                                       vs_sn, vs_sd, V_BITS, V_TG, V_CG, HEAD_DIM, BLOCK_N, DOT_F32)
            if V_TG != 1:  # a slot group's scale may be shared with dead slots' garbage: zero those
                v0 = tl.where(live[:, None], v0, 0.0)
                v1 = tl.where(live[:, None], v1, 0.0)
                v2 = tl.where(live[:, None], v2, 0.0)
                v3 = tl.where(live[:, None], v3, 0.0)
            pv = _operand(p, p_dtype, DOT_F32)
            acc0 = acc0 * alpha[:, None] + tl.dot(pv, v0)
            acc1 = acc1 * alpha[:, None] + tl.dot(pv, v1)
            if V_PER == 4:
                acc2 = acc2 * alpha[:, None] + tl.dot(pv, v2)
                acc3 = acc3 * alpha[:, None] + tl.dot(pv, v3)
        else:
            v = _tile(v_base, n0, live, v_sn, v_sd, V_BITS, HEAD_DIM, BLOCK_N, DOT_F32)
            if V_BITS == 8:  # FP8: the slot's scale on its probability (over the range's largest)
                v_scale = tl.load(vs_ptr + vs_off + n * vs_sn, mask=live, other=0.0) / v_top
                acc0 = acc0 * alpha[:, None] + tl.dot(_operand(p * v_scale[None, :], p_dtype, DOT_F32), v)
            else:
                acc0 = acc0 * alpha[:, None] + tl.dot(_operand(p, p_dtype, DOT_F32), v)
        m_i = m_new
    part = (bh * n_splits_total + split_offset + split) * PART_M + rows  # PART_M rows a partial, BLOCK_M >= it
    kept = rows < PART_M
    tl.store(m_ptr + part, m_i, mask=kept)
    tl.store(l_ptr + part, l_i, mask=kept)
    j = tl.arange(0, VNB)
    out = acc_ptr + part[:, None] * HEAD_DIM + (j * V_PER)[None, :]
    tl.store(out, acc0 * v_top, mask=kept[:, None])
    if V_PER > 1:
        tl.store(out + 1, acc1, mask=kept[:, None])
    if V_PER == 4:
        tl.store(out + 2, acc2, mask=kept[:, None])
        tl.store(out + 3, acc3, mask=kept[:, None])


@triton.jit
def _partials_t(q_ptr, k_ptr, ks_ptr, kz_ptr, v_ptr, vs_ptr, vz_ptr, pos_ptr, start_ptr, qpos_ptr,
                acc_ptr, m_ptr, l_ptr, logit_ptr,
                qk_scale, n_slots, per_split, split_offset, logit_offset, logit_len, n_splits_total,
                q_sb, q_sr, k_sb, k_sh, k_sn, k_sd, ks_sb, ks_sh, ks_sn, ks_sd,
                v_sb, v_sh, v_sn, v_sd, vs_sb, vs_sh, vs_sn, vs_sd, p_sb, p_sh, p_sn,
                HKV: tl.constexpr, ROWS: tl.constexpr, T: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_M: tl.constexpr, PART_M: tl.constexpr, BLOCK_N: tl.constexpr,
                K_BITS: tl.constexpr, K_TG: tl.constexpr, K_CG: tl.constexpr,
                V_BITS: tl.constexpr, V_TG: tl.constexpr, V_CG: tl.constexpr,
                CAUSAL: tl.constexpr, WEIGHTS: tl.constexpr, DOT_F32: tl.constexpr):
    """`_partials` with the products transposed: logits [slots, rows] = keys . query^T and output^T
    [channels, rows] = values^T . probabilities, so that the few query rows (padded to 8, not 16)
    are the tensor cores' narrow dimension and the slots their wide one."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < ROWS
    K_PER: tl.constexpr = 8 // K_BITS if K_BITS < 8 else 1
    V_PER: tl.constexpr = 8 // V_BITS if V_BITS < 8 else 1
    VNB: tl.constexpr = HEAD_DIM // V_PER
    q0, q1, q2, q3, logit_scale = _queries(q_ptr, b, h, rows, row_ok, q_sb, q_sr, qk_scale, K_BITS, K_PER, ROWS,
                                           HEAD_DIM, DOT_F32)
    q0, q1, q2, q3 = tl.trans(q0), tl.trans(q1), tl.trans(q2), tl.trans(q3)
    dtype = q_ptr.dtype.element_ty
    p_dtype = dtype if V_BITS == 16 else tl.float16
    first = tl.load(start_ptr + b)
    if CAUSAL:
        q_pos = tl.load(qpos_ptr + b * T + rows % T, mask=row_ok, other=-1)
    k_base = k_ptr + b * k_sb + h * k_sh
    v_base = v_ptr + b * v_sb + h * v_sh
    ks_off = b * ks_sb + h * ks_sh
    vs_off = b * vs_sb + h * vs_sh
    m_i = tl.full([BLOCK_M], NEG, tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc0 = tl.full([VNB, BLOCK_M], 0.0, tl.float32)  # channels V_PER * j + i in acc_i, transposed
    acc1 = tl.full([VNB, BLOCK_M], 0.0, tl.float32)
    acc2 = tl.full([VNB, BLOCK_M], 0.0, tl.float32)
    acc3 = tl.full([VNB, BLOCK_M], 0.0, tl.float32)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, n_slots)
    v_top = 1.0
    if V_BITS == 8:
        v_top = _v_top(vs_ptr + vs_off, lo, hi, vs_sn, BLOCK_N)
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        in_range = n < hi
        pos = tl.load(pos_ptr + b * p_sb + h * p_sh + n * p_sn, mask=in_range, other=-1)
        live = in_range & (pos >= first)
        if K_BITS < 8:
            k0, k1, k2, k3 = _int_tile(k_base, ks_ptr + ks_off, kz_ptr + ks_off, n0, hi, in_range, k_sn, k_sd,
                                       ks_sn, ks_sd, K_BITS, K_TG, K_CG, HEAD_DIM, BLOCK_N, DOT_F32)
            s = tl.dot(k0, q0)
            s = tl.dot(k1, q1, s)
            if K_PER == 4:
                s = tl.dot(k2, q2, s)
                s = tl.dot(k3, q3, s)
        else:
            s = tl.dot(_tile(k_base, n0, in_range, k_sn, k_sd, K_BITS, HEAD_DIM, BLOCK_N, DOT_F32), q0)
        if K_BITS == 8:  # FP8: the slot's scale on its logit
            s = s * (tl.load(ks_ptr + ks_off + n * ks_sn, mask=in_range, other=0.0) * logit_scale)[:, None]
        else:
            s = s * logit_scale
        allowed = live[:, None] & row_ok[None, :]
        if CAUSAL:
            allowed = allowed & (pos[:, None] <= q_pos[None, :])
        s = tl.where(allowed, s, float("-inf"))
        if WEIGHTS:
            w_ptr = logit_ptr + (bh * ROWS + rows)[None, :] * logit_len + logit_offset + n[:, None]
            tl.store(w_ptr, s, mask=row_ok[None, :] & in_range[:, None])
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[None, :])
        l_i = l_i * alpha + tl.sum(p, 0)
        if V_BITS < 8:
            v0, v1, v2, v3 = _int_tile(v_base, vs_ptr + vs_off, vz_ptr + vs_off, n0, hi, live, v_sn, v_sd,
                                       vs_sn, vs_sd, V_BITS, V_TG, V_CG, HEAD_DIM, BLOCK_N, DOT_F32)
            if V_TG != 1:  # a slot group's scale may be shared with dead slots' garbage: zero those
                v0 = tl.where(live[:, None], v0, 0.0)
                v1 = tl.where(live[:, None], v1, 0.0)
                v2 = tl.where(live[:, None], v2, 0.0)
                v3 = tl.where(live[:, None], v3, 0.0)
            pv = _operand(p, p_dtype, DOT_F32)
            acc0 = acc0 * alpha[None, :] + tl.dot(tl.trans(v0), pv)
            acc1 = acc1 * alpha[None, :] + tl.dot(tl.trans(v1), pv)
            if V_PER == 4:
                acc2 = acc2 * alpha[None, :] + tl.dot(tl.trans(v2), pv)
                acc3 = acc3 * alpha[None, :] + tl.dot(tl.trans(v3), pv)
        else:
            v = tl.trans(_tile(v_base, n0, live, v_sn, v_sd, V_BITS, HEAD_DIM, BLOCK_N, DOT_F32))
            if V_BITS == 8:  # FP8: the slot's scale on its probability (over the range's largest)
                v_scale = tl.load(vs_ptr + vs_off + n * vs_sn, mask=live, other=0.0) / v_top
                acc0 = acc0 * alpha[None, :] + tl.dot(v, _operand(p * v_scale[:, None], p_dtype, DOT_F32))
            else:
                acc0 = acc0 * alpha[None, :] + tl.dot(v, _operand(p, p_dtype, DOT_F32))
        m_i = m_new
    part = (bh * n_splits_total + split_offset + split) * PART_M + rows  # here BLOCK_M == PART_M
    tl.store(m_ptr + part, m_i)
    tl.store(l_ptr + part, l_i)
    j = tl.arange(0, VNB)
    out = acc_ptr + part[None, :] * HEAD_DIM + (j * V_PER)[:, None]
    tl.store(out, acc0 * v_top)
    if V_PER > 1:
        tl.store(out + 1, acc1)
    if V_PER == 4:
        tl.store(out + 2, acc2)
        tl.store(out + 3, acc3)


@triton.jit
def _combine(acc_ptr, m_ptr, l_ptr, out_ptr, lse_ptr, n_splits, out_sb, out_sr,
             HKV: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
             SPLITS: tl.constexpr):
    pid = tl.program_id(0)
    bh = pid // ROWS
    r = pid % ROWS
    b = bh // HKV
    h = bh % HKV
    s = tl.arange(0, SPLITS)
    ok = s < n_splits
    part = (bh * n_splits + s) * BLOCK_M + r
    m = tl.load(m_ptr + part, mask=ok, other=NEG)
    l_s = tl.load(l_ptr + part, mask=ok, other=0.0)
    d = tl.arange(0, HEAD_DIM)
    acc = tl.load(acc_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=ok[:, None], other=0.0)
    top = tl.max(m, 0)
    w = tl.exp2(m - top)
    total = tl.sum(w * l_s, 0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * out_sb + (h * ROWS + r) * out_sr + d, out.to(out_ptr.dtype.element_ty))
    tl.store(lse_ptr + pid, tl.where(total > 0, top + tl.log2(total), float("-inf")))


@triton.jit
def _weights(logit_ptr, lse_ptr, w_ptr, n_slots, ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr,
             PER_ROW: tl.constexpr):
    """exp(logit - lse) of every slot: averaged over the KV group's rows into w [B * Hkv, N], or per row
    (PER_ROW: w [B * Hkv * ROWS, N], which may be the logits' own buffer)."""
    bh = tl.program_id(0)
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < ROWS
    lse = tl.load(lse_ptr + bh * ROWS + rows, mask=row_ok, other=0.0)
    ok = row_ok[:, None] & (n < n_slots)[None, :]
    at = (bh * ROWS + rows)[:, None] * n_slots + n[None, :]
    logits = tl.load(logit_ptr + at, mask=ok, other=float("-inf"))
    p = tl.where(ok & (lse > float("-inf"))[:, None], tl.exp2(logits - lse[:, None]), 0.0)
    if PER_ROW:
        tl.store(w_ptr + at, p, mask=ok)
    else:
        tl.store(w_ptr + bh * n_slots + n, tl.sum(p, 0) / ROWS, mask=n < n_slots)


def interpreting() -> bool:
    """Whether triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_plan(segments: list[Segment], programs_per_split: int, device: torch.device) -> tuple[int, list[int]]:
    """(slots per split, splits per segment): up to WAVES programs per SM over all segments, so that
    b1 x 32K fills the GPU, but no split under MIN_SPLIT_SLOTS slots (more would cost more than they
    spread). Splits start on a multiple of every tile size."""
    quantum = max(tile[0] for tile in TILES.values())
    wanted = max(1, math.ceil(WAVES * _sm_count(device) / programs_per_split))
    per_split = max(MIN_SPLIT_SLOTS, math.ceil(sum(s.slots for s in segments) / wanted), 1)
    per_split = math.ceil(per_split / quantum) * quantum
    return per_split, [math.ceil(s.slots / per_split) for s in segments]


def _format(bits: int) -> str:
    """The key of TILES for codes of `bits` bits."""
    return "model" if bits == 16 else "fp8" if bits == 8 else "int"


def _side(codes: Codes) -> tuple[list[torch.Tensor], list[int], dict[str, int]]:
    """One side's tensors (codes, scale, zero), their strides (codes' 4, then the scale's 4, which the
    zero point shares) and its format's constants."""
    scale = codes.scale if codes.scale is not None else codes.data  # placeholders where the format has none
    zero = codes.zero if codes.zero is not None else scale
    if zero.stride() != scale.stride():
        scale, zero = scale.contiguous(), zero.contiguous()
    tg, cg = codes.groups
    cg = codes.head_dim if codes.scale is None else cg
    return [codes.data, scale, zero], [*codes.data.stride(), *scale.stride()], {"BITS": codes.bits, "TG": tg, "CG": cg}


def triton_attention(query: torch.Tensor, segments: list[Segment], start: torch.Tensor, scaling: float,
                     query_pos: torch.Tensor | None = None, return_weights: bool = False, per_row: bool = False
                     ) -> tuple[torch.Tensor, list[torch.Tensor] | torch.Tensor | None]:
    """Same contract as `reference_attention`; query in bf16 or fp16."""
    b, hq, t, d = query.shape
    hkv = segments[0].pos.shape[1]
    rows = hq // hkv * t
    part_m = max(8, triton.next_power_of_2(rows))  # rows a partial result keeps (the transposed kernel's padding)
    q = query.reshape(b, hq * t, d)
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = query.new_empty(b, hq * t, d)
    start = start.to(torch.int32).contiguous()
    qpos = (query_pos.to(torch.int32).expand(b, t).contiguous() if query_pos is not None
            else torch.empty(1, dtype=torch.int32, device=query.device))
    n_total = sum(s.slots for s in segments)
    f32 = dict(dtype=torch.float32, device=query.device)
    if n_total == 0:  # nothing to attend: zeros, as the reference's fully masked rows
        if not return_weights:
            return query.new_zeros(query.shape), None
        return query.new_zeros(query.shape), (torch.zeros(b, hq, t, 0, **f32) if per_row
                                              else [torch.zeros(b, hkv, 0, **f32) for _ in segments])
    per_split, splits = split_plan(segments, b * hkv, query.device)
    total_splits = sum(splits)
    acc = torch.empty(b * hkv * total_splits * part_m * d, **f32)  # every split is written by its program
    m = torch.empty(b * hkv * total_splits * part_m, **f32)
    l_sum = torch.empty(b * hkv * total_splits * part_m, **f32)
    logits = torch.empty(b * hkv * rows * n_total if return_weights else 1, **f32)
    qk_scale = scaling * LOG2E
    offset, seen = 0, 0
    for seg, n_split in zip(segments, splits):
        if n_split:
            k_args, k_strides, kc = _side(seg.keys)
            v_args, v_strides, vc = _side(seg.values)
            block_n, warps, stages, transposed = TILES[_format(min(kc["BITS"], vc["BITS"]))]
            (_partials_t if transposed else _partials)[(b * hkv, n_split)](
                q, *k_args, *v_args, seg.pos, start, qpos, acc, m, l_sum, logits,
                qk_scale, seg.slots, per_split, offset, seen, n_total, total_splits,
                q.stride(0), q.stride(1), *k_strides, *v_strides, *seg.pos.stride(),
                HKV=hkv, ROWS=rows, T=t, HEAD_DIM=d, BLOCK_M=part_m if transposed else max(16, part_m), PART_M=part_m,
                BLOCK_N=block_n,
                **{f"K_{name}": v for name, v in kc.items()}, **{f"V_{name}": v for name, v in vc.items()},
                CAUSAL=query_pos is not None, WEIGHTS=return_weights, DOT_F32=interpreting(),
                num_warps=warps, num_stages=stages)
        offset += n_split
        seen += seg.slots
    lse = torch.empty(b * hkv * rows, **f32)
    _combine[(b * hkv * rows,)](acc, m, l_sum, out, lse, total_splits, out.stride(0), out.stride(1),
                                HKV=hkv, ROWS=rows, HEAD_DIM=d, BLOCK_M=part_m,
                                SPLITS=triton.next_power_of_2(total_splits))
    out = out.view(b, hq, t, d)
    if not return_weights:
        return out, None
    block = 128
    grid = (b * hkv, triton.cdiv(max(n_total, 1), block))
    if per_row:  # in place: the logits become the probabilities, [B, Hq, T, N] as the query's rows
        _weights[grid](logits, lse, logits, n_total, ROWS=rows, BLOCK_M=part_m, BLOCK=block, PER_ROW=True)
        return out, logits.view(b, hq, t, n_total)
    weights = torch.empty(b, hkv, n_total, **f32)
    _weights[grid](logits, lse, weights, n_total, ROWS=rows, BLOCK_M=part_m, BLOCK=block, PER_ROW=False)
    return out, list(weights.split([s.slots for s in segments], dim=-1))
