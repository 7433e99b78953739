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
# Launch settings, the fastest of `scripts/bench_kernel.py --sweep` on one H200 at b1 and b8 x 32K
# (Llama-3.1-8B shape): slots per tile (model dtype and FP8; packed int codes), programs per SM
# aimed at by the split-K plan, the fewest slots a split takes, Triton's warps and pipeline stages.
BLOCK_N = 128
BLOCK_N_INT = 64
WAVES = 8
MIN_SPLIT_SLOTS = 1024
NUM_WARPS = 4
NUM_STAGES = 2
NEG = tl.constexpr(-1.0e30)  # finite "minus infinity" for running maxima: exp2(NEG - NEG) stays defined


@triton.jit
def _per_group(ptr, n, n0, hi, d, ok, s_stride_n, s_stride_d,
               TG: tl.constexpr, CG: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """A scale or zero point [BLOCK_N, HEAD_DIM] (float32) for slots n = n0.. of groups TG slots x CG channels.

    The common groupings load only their distinct values and broadcast them (a full-size gather
    would be pipelined through shared memory at four bytes per value); others gather."""
    if TG == 1 and ((HEAD_DIM // CG) & (HEAD_DIM // CG - 1)) == 0:  # per slot, groups of channels (KIVI values, AKV)
        NG: tl.constexpr = HEAD_DIM // CG
        g = tl.arange(0, NG)
        x = tl.load(ptr + n[:, None] * s_stride_n + g[None, :] * s_stride_d, mask=ok[:, None], other=0.0)
        x = tl.reshape(tl.broadcast_to(x[:, :, None], (BLOCK_N, NG, CG)), (BLOCK_N, HEAD_DIM))
    elif CG == 1 and BLOCK_N % TG == 0:  # per channel, groups of slots (KIVI keys); tiles start on a group
        NT: tl.constexpr = BLOCK_N // TG
        t = tl.arange(0, NT)
        x = tl.load(ptr + (n0 // TG + t)[:, None] * s_stride_n + d[None, :] * s_stride_d,
                    mask=(n0 + t * TG < hi)[:, None], other=0.0)
        x = tl.reshape(tl.broadcast_to(x[:, None, :], (NT, TG, HEAD_DIM)), (BLOCK_N, HEAD_DIM))
    else:
        x = tl.load(ptr + (n // TG)[:, None] * s_stride_n + (d // CG)[None, :] * s_stride_d, mask=ok[:, None],
                    other=0.0)
    return x


@triton.jit
def _tile(ptr, scale_ptr, zero_ptr, n0, hi, stride_n, stride_d, s_stride_n, s_stride_d,
          BITS: tl.constexpr, TG: tl.constexpr, CG: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """Slots n0.. (below hi) x all channels of one side, dequantized (float32; as stored for bits 16);
    slots at or past hi read 0."""
    n = n0 + tl.arange(0, BLOCK_N)
    ok = n < hi
    d = tl.arange(0, HEAD_DIM)
    if BITS == 16:
        x = tl.load(ptr + n[:, None] * stride_n + d[None, :] * stride_d, mask=ok[:, None], other=0.0)
    else:
        if BITS == 8:
            codes = tl.load(ptr + n[:, None] * stride_n + d[None, :] * stride_d, mask=ok[:, None], other=0.0)
            codes = codes.to(tl.float32)
        else:  # PER codes a byte, the first in the low bits
            PER: tl.constexpr = 8 // BITS
            NB: tl.constexpr = HEAD_DIM // PER
            nb = tl.arange(0, NB)
            byte = tl.load(ptr + n[:, None] * stride_n + nb[None, :] * stride_d, mask=ok[:, None], other=0)
            shift = tl.arange(0, PER) * BITS
            codes = (byte.to(tl.int32)[:, :, None] >> shift[None, None, :]) & ((1 << BITS) - 1)
            codes = tl.reshape(codes, (BLOCK_N, HEAD_DIM)).to(tl.float32)
        if CG == HEAD_DIM and TG == 1:  # one scale per slot (FP8)
            x = codes * tl.load(scale_ptr + n * s_stride_n, mask=ok, other=0.0)[:, None]
            if BITS != 8:
                x += tl.load(zero_ptr + n * s_stride_n, mask=ok, other=0.0)[:, None]
        else:
            x = codes * _per_group(scale_ptr, n, n0, hi, d, ok, s_stride_n, s_stride_d, TG, CG, HEAD_DIM, BLOCK_N)
            if BITS != 8:
                x += _per_group(zero_ptr, n, n0, hi, d, ok, s_stride_n, s_stride_d, TG, CG, HEAD_DIM, BLOCK_N)
    return x


@triton.jit
def _operand(x, dtype, DOT_F32: tl.constexpr):
    """x rounded to the model's dtype, as a dot operand: that dtype, or float32 under the interpreter
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
def _partials(q_ptr, k_ptr, ks_ptr, kz_ptr, v_ptr, vs_ptr, vz_ptr, pos_ptr, start_ptr, qpos_ptr,
              acc_ptr, m_ptr, l_ptr, logit_ptr,
              qk_scale, n_slots, per_split, split_offset, logit_offset, logit_len, n_splits_total,
              q_sb, q_sr, k_sb, k_sh, k_sn, k_sd, ks_sb, ks_sh, ks_sn, ks_sd,
              v_sb, v_sh, v_sn, v_sd, vs_sb, vs_sh, vs_sn, vs_sd, p_sb, p_sh, p_sn,
              HKV: tl.constexpr, ROWS: tl.constexpr, T: tl.constexpr, HEAD_DIM: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              K_BITS: tl.constexpr, K_TG: tl.constexpr, K_CG: tl.constexpr,
              V_BITS: tl.constexpr, V_TG: tl.constexpr, V_CG: tl.constexpr,
              CAUSAL: tl.constexpr, WEIGHTS: tl.constexpr, DOT_F32: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < ROWS
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b * q_sb + (h * ROWS + rows)[:, None] * q_sr + d[None, :], mask=row_ok[:, None], other=0.0)
    dtype = q.dtype
    if DOT_F32:
        q = q.to(tl.float32)
    first = tl.load(start_ptr + b)
    if CAUSAL:
        q_pos = tl.load(qpos_ptr + b * T + rows % T, mask=row_ok, other=-1)
    k_base = k_ptr + b * k_sb + h * k_sh
    v_base = v_ptr + b * v_sb + h * v_sh
    ks_off = b * ks_sb + h * ks_sh
    vs_off = b * vs_sb + h * vs_sh
    m_i = tl.full([BLOCK_M], NEG, tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, HEAD_DIM], 0.0, tl.float32)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, n_slots)
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        in_range = n < hi
        pos = tl.load(pos_ptr + b * p_sb + h * p_sh + n * p_sn, mask=in_range, other=-1)
        live = in_range & (pos >= first)
        k = _tile(k_base, ks_ptr + ks_off, kz_ptr + ks_off, n0, hi, k_sn, k_sd, ks_sn, ks_sd,
                  K_BITS, K_TG, K_CG, HEAD_DIM, BLOCK_N)
        k = _operand(k, dtype, DOT_F32)
        s = tl.dot(q, tl.trans(k)) * qk_scale
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
        v = _tile(v_base, vs_ptr + vs_off, vz_ptr + vs_off, n0, hi, v_sn, v_sd, vs_sn, vs_sd,
                  V_BITS, V_TG, V_CG, HEAD_DIM, BLOCK_N)
        v = _operand(v, dtype, DOT_F32)
        v = tl.where(live[:, None], v, 0.0)  # empty slots may hold anything, NaN included
        acc = acc * alpha[:, None] + tl.dot(_operand(p, dtype, DOT_F32), v)
        m_i = m_new
    part = (bh * n_splits_total + split_offset + split) * BLOCK_M + rows
    tl.store(m_ptr + part, m_i)
    tl.store(l_ptr + part, l_i)
    tl.store(acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc)


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
def _weights(logit_ptr, lse_ptr, w_ptr, n_slots, ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr):
    bh = tl.program_id(0)
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < ROWS
    lse = tl.load(lse_ptr + bh * ROWS + rows, mask=row_ok, other=0.0)
    ok = row_ok[:, None] & (n < n_slots)[None, :]
    logits = tl.load(logit_ptr + (bh * ROWS + rows)[:, None] * n_slots + n[None, :], mask=ok, other=float("-inf"))
    p = tl.where(ok & (lse > float("-inf"))[:, None], tl.exp2(logits - lse[:, None]), 0.0)
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
    quantum = max(BLOCK_N, BLOCK_N_INT)
    wanted = max(1, math.ceil(WAVES * _sm_count(device) / programs_per_split))
    per_split = max(MIN_SPLIT_SLOTS, math.ceil(sum(s.slots for s in segments) / wanted), 1)
    per_split = math.ceil(per_split / quantum) * quantum
    return per_split, [math.ceil(s.slots / per_split) for s in segments]


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
                     query_pos: torch.Tensor | None = None, return_weights: bool = False
                     ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """Same contract as `reference_attention`; query in bf16 or fp16."""
    b, hq, t, d = query.shape
    hkv = segments[0].pos.shape[1]
    rows = hq // hkv * t
    block_m = max(16, triton.next_power_of_2(rows))
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
        return query.new_zeros(query.shape), ([torch.zeros(b, hkv, 0, **f32) for _ in segments]
                                              if return_weights else None)
    per_split, splits = split_plan(segments, b * hkv, query.device)
    total_splits = sum(splits)
    acc = torch.empty(b * hkv * total_splits * block_m * d, **f32)  # every split is written by its program
    m = torch.empty(b * hkv * total_splits * block_m, **f32)
    l_sum = torch.empty(b * hkv * total_splits * block_m, **f32)
    logits = torch.empty(b * hkv * rows * n_total if return_weights else 1, **f32)
    qk_scale = scaling * LOG2E
    offset, seen = 0, 0
    for seg, n_split in zip(segments, splits):
        if n_split:
            k_args, k_strides, kc = _side(seg.keys)
            v_args, v_strides, vc = _side(seg.values)
            _partials[(b * hkv, n_split)](
                q, *k_args, *v_args, seg.pos, start, qpos, acc, m, l_sum, logits,
                qk_scale, seg.slots, per_split, offset, seen, n_total, total_splits,
                q.stride(0), q.stride(1), *k_strides, *v_strides, *seg.pos.stride(),
                HKV=hkv, ROWS=rows, T=t, HEAD_DIM=d, BLOCK_M=block_m,
                BLOCK_N=BLOCK_N_INT if min(kc["BITS"], vc["BITS"]) < 8 else BLOCK_N,
                **{f"K_{name}": v for name, v in kc.items()}, **{f"V_{name}": v for name, v in vc.items()},
                CAUSAL=query_pos is not None, WEIGHTS=return_weights, DOT_F32=interpreting(),
                num_warps=NUM_WARPS, num_stages=NUM_STAGES)
        offset += n_split
        seen += seg.slots
    lse = torch.empty(b * hkv * rows, **f32)
    _combine[(b * hkv * rows,)](acc, m, l_sum, out, lse, total_splits, out.stride(0), out.stride(1),
                                HKV=hkv, ROWS=rows, HEAD_DIM=d, BLOCK_M=block_m,
                                SPLITS=triton.next_power_of_2(total_splits))
    out = out.view(b, hq, t, d)
    if not return_weights:
        return out, None
    weights = torch.empty(b, hkv, n_total, **f32)
    block = 128
    _weights[(b * hkv, triton.cdiv(max(n_total, 1), block))](logits, lse, weights, n_total, ROWS=rows,
                                                             BLOCK_M=block_m, BLOCK=block)
    return out, list(weights.split([s.slots for s in segments], dim=-1))
