"""Decode attention over stored segments: the torch reference against the project's attention,
and the Triton kernel against the reference for every storage format.

The Triton kernel runs on CUDA when there is one, else on the CPU under TRITON_INTERPRET=1
(tiny shapes). triton reads that variable when it is first imported, which transformers does
before this file is collected, so on the CPU the kernel tests run again in a fresh pytest
process with it set. Without triton installed they are skipped.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from arkv_bench.cache.akv import make_tier, quantize_tokens
from arkv_bench.cache.attention import attention_probs
from arkv_bench.cache.kernels import Codes, Segment, decode_attention, fp8, original, packed_int, resolve_backend
from arkv_bench.cache.kivi import KiviLayer
from arkv_bench.cache.quantize import INT_BITS, fp8_quantize, int_quantize, pack

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
NO_TRITON = "triton is not installed (pip install triton): only the torch reference is tested"
needs_triton = pytest.mark.skipif(not HAS_TRITON or (DEVICE.type == "cpu" and not INTERPRETING),
                                  reason=NO_TRITON if not HAS_TRITON else "on the CPU: run by the interpreter test")

B, HKV, GROUP, D = 2, 2, 2, 64
# Output: within 1.5e-2 + 1e-2 relative of the reference (both are rounded to bf16; the kernel multiplies
# the probabilities in fp16 or bf16, as flash kernels do, the reference keeps float32; and the reference
# rounds every dequantized key to bf16, which moves these logits of a few units and the outputs by about
# 1e-2: on KIVI's float16-scaled store in the chunk test, 1.2e-2 from the exact attention where the
# kernel is 5e-4 from it).
# Weights: the reference attends today's dequantized view (every value rounded to bf16); the kernel
# keeps FP8's codes exact and applies the scale to the logit, and dequantizes packed ints in fp16, so
# it does not round like the reference (about 1e-2 relative apart on these logits of a few units).
# Both are held to the exact attention over the stored codes (float64): the kernel's largest weight
# error may not exceed the reference's own, plus float32 summation noise.
OUT_TOL = dict(atol=1.5e-2, rtol=1e-2)
W_NOISE = 1e-6
START = torch.tensor([0, 5], dtype=torch.int32)


def positions(c: int, offset: int, seed: int, empty: int = 3) -> torch.Tensor:
    """[B, HKV, c] distinct positions offset.., shuffled per head, the last `empty` slots -1."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.stack([torch.randperm(c, generator=g) for _ in range(B * HKV)]).view(B, HKV, c) + offset
    pos[..., c - empty:] = -1
    return pos.to(torch.int32)


def dense_kv(c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, HKV, c, D, generator=g) * 2).bfloat16(), torch.randn(B, HKV, c, D, generator=g).bfloat16()


def make_segment(kind: str, c: int, offset: int, seed: int):
    """A segment of `kind` made by the project's own quantizers; empty slots hold NaN where the format can."""
    keys, values = dense_kv(c, seed)
    pos = positions(c, offset, seed)
    empty = (pos < 0).unsqueeze(-1)
    if kind == "original":
        return original(keys.masked_fill(empty, float("nan")), values.masked_fill(empty, float("nan")), pos)
    if kind == "fp8":
        (kq, ks), (vq, vs) = fp8_quantize(keys), fp8_quantize(values)
        nan = torch.full_like(kq, float("nan"))
        return fp8(torch.where(empty, nan, kq), ks, torch.where(empty, nan, vq), vs.squeeze(-1), pos)
    bits = int(kind[-1])
    if kind.startswith("kivi"):  # bf16 keys and values: float16 scales and zeros, as KIVI stores them
        return packed_int(KiviLayer(0, bits=bits, group_size=8)._quantize(keys, values), pos, bits)
    return packed_int(make_tier(keys, values, bits, 8), pos, bits)


FORMATS = ("original", "fp8", "kivi4", "kivi2", "akv4", "akv2")


def widened(segment: Segment) -> Segment:
    """The segment with its float16 scales and zeros stored as float32 (the same values)."""
    def wide(c: Codes) -> Codes:
        return Codes(c.data, c.scale.float(), c.zero.float(), c.bits)
    return Segment(wide(segment.keys), wide(segment.values), segment.pos)


def layer(kinds: tuple[str, ...], sizes: tuple[int, ...]):
    segments, offset = [], 0
    for i, (kind, c) in enumerate(zip(kinds, sizes)):
        segments.append(make_segment(kind, c, offset, seed=i))
        offset += c
    return segments, offset


def query(t: int, seed: int = 7) -> torch.Tensor:
    return torch.randn(B, HKV * GROUP, t, D, generator=torch.Generator().manual_seed(seed)).bfloat16()


def on(device: torch.device, segments):
    """The segments with every tensor moved to `device`."""
    def move(c: Codes) -> Codes:
        return Codes(*(x.to(device) if x is not None else None for x in (c.data, c.scale, c.zero)), bits=c.bits)
    return [type(s)(move(s.keys), move(s.values), s.pos.to(device)) for s in segments]


def exact(q: torch.Tensor, segments, start: torch.Tensor, scaling: float, q_pos: torch.Tensor | None = None):
    """Attention over the stored codes dequantized without rounding (float64 query: the reference's
    view is then float32 code * scale + zero, exact to 1e-7)."""
    return decode_attention(q.double(), segments, start, scaling, q_pos, return_weights=True, backend="torch")


def assert_weights_close(got: list[torch.Tensor], reference: list[torch.Tensor], exact_w: list[torch.Tensor]) -> None:
    """The kernel's weights are at least as close to the exact ones as the reference's, up to W_NOISE."""
    got, reference, exact_w = (torch.cat([w.cpu().double() for w in ws], -1) for ws in (got, reference, exact_w))
    kernel_err = (got - exact_w).abs().max().item()
    reference_err = (reference - exact_w).abs().max().item()
    assert kernel_err <= reference_err + W_NOISE, f"kernel off by {kernel_err:.2e}, the reference by {reference_err:.2e}"


# --- the reference ------------------------------------------------------------------------

def test_reference_is_the_projects_attention_over_the_dequantized_view():
    segments, n = layer(("fp8", "akv4", "original"), (40, 32, 20))
    q = query(3)
    q_pos = torch.tensor([n - 30, n - 10, n - 1], dtype=torch.int32)
    out, weights = decode_attention(q, segments, START, 0.3, q_pos, return_weights=True, backend="torch")
    keys = torch.cat([s.keys.dequantize(torch.bfloat16) for s in segments], dim=2)
    values = torch.cat([s.values.dequantize(torch.bfloat16) for s in segments], dim=2)
    pos = torch.cat([s.pos for s in segments], dim=2)
    allowed = (pos >= START.view(-1, 1, 1)).unsqueeze(2) & (pos.unsqueeze(2) <= q_pos.view(1, 1, -1, 1))
    probs = attention_probs(q, keys, allowed, 0.3)
    values = values.float().nan_to_num(0.0).repeat_interleave(GROUP, dim=1)
    torch.testing.assert_close(out, torch.matmul(probs, values).bfloat16(), atol=0, rtol=0)
    expected = probs.view(B, HKV, GROUP, 3, -1).mean(dim=(2, 3))
    torch.testing.assert_close(torch.cat(weights, dim=-1), expected, atol=1e-7, rtol=0)
    assert [w.shape[-1] for w in weights] == [40, 32, 20]


def test_reference_weights_sum_to_one_and_skip_dead_slots():
    segments, _ = layer(("kivi4", "original"), (64, 16))
    _, weights = decode_attention(query(1), segments, START, D ** -0.5, return_weights=True, backend="torch")
    total = sum(w.sum(-1) for w in weights)
    torch.testing.assert_close(total, torch.ones(B, HKV), atol=1e-5, rtol=0)
    for seg, w in zip(segments, weights):
        assert (w[seg.pos < START.view(-1, 1, 1)] == 0).all()


@pytest.mark.parametrize("bits", INT_BITS)
def test_reference_dequantizes_16_bit_scales_in_float32(bits: int):
    """KIVI's store of a bf16 model keeps float16 scales and zeros; the reference dequantizes them in float32,
    to the last bit what it gives for the same values stored in float32."""
    segment = make_segment(f"kivi{bits}", 64, 0, seed=4)
    wide = widened(segment)
    for half, full in ((segment.keys, wide.keys), (segment.values, wide.values)):
        assert half.scale.dtype == half.zero.dtype == torch.float16
        torch.testing.assert_close(half.dequantize(torch.float32), full.dequantize(torch.float32), atol=0, rtol=0)


def test_a_query_with_no_live_slot_gets_zeros():
    segments, _ = layer(("original",), (8,))
    out, weights = decode_attention(query(1), segments, torch.tensor([100, 100], dtype=torch.int32), 0.2,
                                    return_weights=True, backend="torch")
    assert (out == 0).all() and (weights[0] == 0).all()


def test_bad_segments_and_backend_are_refused():
    keys, values = dense_kv(4, 0)
    pos = positions(4, 0, 0, empty=0)
    with pytest.raises(ValueError, match="need a scale"):
        Codes(keys.to(torch.float8_e4m3fn), bits=8)
    with pytest.raises(ValueError, match="does not tile"):
        Codes(keys.to(torch.float8_e4m3fn), torch.ones(B, HKV, 3, 1), bits=8)
    kivi = make_segment("kivi4", 8, 0, seed=0).keys
    with pytest.raises(ValueError, match="float32 or float16"):  # the kernel rounds them to fp16: not bf16's range
        Codes(kivi.data, kivi.scale.bfloat16(), kivi.zero.bfloat16(), bits=4)
    with pytest.raises(ValueError, match="do not match positions"):
        original(keys, values, pos[..., :3])
    with pytest.raises(ValueError, match="query heads"):
        decode_attention(torch.zeros(B, 3, 1, D), [original(keys, values, pos)], START, 1.0)
    with pytest.raises(ValueError, match="attention kernel must be one of"):
        resolve_backend("cuda", DEVICE)
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cuda"), torch.float32) == "torch"
    cuda = torch.device("cuda")  # resolve_backend only reads the device's type
    with pytest.raises(ValueError, match="at most 128 rows"):
        resolve_backend("triton", cuda, torch.bfloat16, rows=256)
    with pytest.raises(ValueError, match="2-bit codes"):  # int2 codes need 64 channels: 4 dots of 16
        resolve_backend("triton", cuda, torch.bfloat16, head_dim=32, bits=2)
    if not INTERPRETING:
        with pytest.raises(ValueError, match="runs on CUDA"):
            resolve_backend("triton", torch.device("cpu"))
    assert resolve_backend("auto", torch.device("cuda"), torch.bfloat16, head_dim=32, bits=2) == "torch"


# --- the Triton kernel against the reference -----------------------------------------------

@pytest.fixture(autouse=True, params=["default", "transposed"])
def small_splits(request, monkeypatch):
    """Kernel tests: splits of 128 slots, so that the tiny stores still span several splits. The
    per-format test also runs every format through the transposed products (`_partials_t`)."""
    if request.param == "transposed" and "per_format" not in request.node.name:
        pytest.skip("the transposed kernel: the per-format test covers it")
    if "triton_" in request.node.name and HAS_TRITON:
        from arkv_bench.cache.kernels import triton_decode
        monkeypatch.setattr(triton_decode, "MIN_SPLIT_SLOTS", 64)
        if request.param == "transposed":
            monkeypatch.setattr(triton_decode, "TILES", {key: (*tile[:3], True)
                                                         for key, tile in triton_decode.TILES.items()})

@pytest.mark.skipif(not HAS_TRITON, reason=NO_TRITON)
@pytest.mark.parametrize("batch, sms", [(1, 132), (8, 132), (2, 4)])
def test_split_plan_covers_every_slot_once_in_aligned_splits(batch: int, sms: int, monkeypatch):
    from arkv_bench.cache.kernels import triton_decode

    monkeypatch.setattr(triton_decode, "_sm_count", lambda device: sms)
    sizes = (32640, 128)
    per_split, splits = triton_decode.split_plan([SimpleNamespace(slots=c) for c in sizes], batch * HKV * 4, DEVICE)
    assert all(per_split % tile[0] == 0 for tile in triton_decode.TILES.values())
    assert per_split >= triton_decode.MIN_SPLIT_SLOTS
    assert all((n - 1) * per_split < c <= n * per_split for n, c in zip(splits, sizes))


@pytest.mark.skipif(not HAS_TRITON or DEVICE.type == "cuda" or INTERPRETING, reason=NO_TRITON if not HAS_TRITON
                    else "the kernel tests run directly")
def test_triton_kernel_under_the_cpu_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "triton_"],
                         cwd=Path(__file__).parent.parent, env=env, capture_output=True, text=True)
    assert run.returncode == 0 and " passed" in run.stdout, run.stdout[-4000:] + run.stderr[-2000:]


def assert_triton_matches_reference(q: torch.Tensor, segments: list) -> None:
    """The kernel's output within the formats' bound of the reference, its weights at least as close to exact."""
    ref_out, ref_w = decode_attention(q, segments, START, D ** -0.5, return_weights=True, backend="torch")
    out, w = decode_attention(q.to(DEVICE), on(DEVICE, segments), START.to(DEVICE), D ** -0.5,
                              return_weights=True, backend="triton")
    torch.testing.assert_close(out.cpu().float(), ref_out.float(), **OUT_TOL)
    assert_weights_close(w, ref_w, exact(q, segments, START, D ** -0.5)[1])


@needs_triton
@pytest.mark.parametrize("kind", FORMATS)
def test_triton_matches_reference_per_format(kind: str):
    """Each format alone and behind an Original segment (KIVI's residual, AKV's hot tier), several splits."""
    segments, n = layer((kind, "original"), (136, 24))
    q = query(1)
    assert_triton_matches_reference(q, segments)


@needs_triton
@pytest.mark.parametrize("bits", INT_BITS)
def test_triton_reads_16_bit_kivi_scales(bits: int):
    """KIVI's float16 scales and zeros (a bf16 model's store) against the reference, and bit for bit what the
    kernel gives for the same values stored in float32: it multiplies in fp16 either way."""
    segments, _ = layer((f"kivi{bits}", "original"), (136, 24))
    assert segments[0].keys.scale.dtype == segments[0].values.zero.dtype == torch.float16
    q = query(1)
    assert_triton_matches_reference(q, segments)
    half, full = (decode_attention(q.to(DEVICE), on(DEVICE, segs), START.to(DEVICE), D ** -0.5, return_weights=True,
                                   backend="triton") for segs in (segments, [widened(segments[0]), segments[1]]))
    torch.testing.assert_close(half[0], full[0], atol=0, rtol=0)
    torch.testing.assert_close(torch.cat(half[1], -1), torch.cat(full[1], -1), atol=0, rtol=0)


@needs_triton
def test_triton_chunk_of_queries_is_causal_across_segments():
    segments, n = layer(("fp8", "kivi4", "original"), (70, 64, 30))
    q = query(3)
    q_pos = torch.tensor([n - 60, n - 20, n - 1], dtype=torch.int32)
    ref_out, ref_w = decode_attention(q, segments, START, 0.25, q_pos, return_weights=True, backend="torch")
    as_model_gives = q.transpose(1, 2).contiguous().transpose(1, 2).to(DEVICE)  # [B, T, Hq, D] seen as [B, Hq, T, D]
    out, w = decode_attention(as_model_gives, on(DEVICE, segments), START.to(DEVICE), 0.25, q_pos.to(DEVICE),
                              return_weights=True, backend="triton")
    torch.testing.assert_close(out.cpu().float(), ref_out.float(), **OUT_TOL)
    assert_weights_close(w, ref_w, exact(q, segments, START, 0.25, q_pos)[1])
    out_only, none = decode_attention(q.to(DEVICE), on(DEVICE, segments), START.to(DEVICE), 0.25, q_pos.to(DEVICE),
                                      backend="triton")
    assert none is None
    torch.testing.assert_close(out_only, out, atol=0, rtol=0)


@needs_triton
def test_triton_key_groups_longer_than_a_tile():
    """Keys grouped per channel over 128 slots, more than one tile of the kernel: the general (gathering) path."""
    keys, values = dense_kv(256, 3)
    codes, scale, zero = int_quantize(keys.view(B, HKV, 2, 128, D), 4, dim=3)
    k = Codes(pack(codes.view(B, HKV, 256, D), 4), scale.squeeze(3), zero.squeeze(3), bits=4)
    segments = [Segment(k, Codes(*quantize_tokens(values, 4, 8), bits=4), positions(256, 0, 3))]
    q = query(1)
    assert_triton_matches_reference(q, segments)


@needs_triton
def test_triton_probabilities_per_query_row():
    """per_row: every query head's probabilities over all slots (what the slot store's scoring reads),
    their group mean the per-segment weights."""
    segments, n = layer(("original", "fp8"), (40, 136))
    q = query(2)
    q_pos = torch.tensor([n - 5, n - 1], dtype=torch.int32)
    ref_out, ref_p = decode_attention(q, segments, START, 0.2, q_pos, return_weights=True, backend="torch", per_row=True)
    out, p = decode_attention(q.to(DEVICE), on(DEVICE, segments), START.to(DEVICE), 0.2, q_pos.to(DEVICE),
                              return_weights=True, backend="triton", per_row=True)
    assert p.shape == (B, HKV * GROUP, 2, 176)
    torch.testing.assert_close(out.cpu().float(), ref_out.float(), **OUT_TOL)
    exact_p = decode_attention(q.double(), segments, START, 0.2, q_pos, return_weights=True, backend="torch",
                               per_row=True)[1]
    assert_weights_close([p], [ref_p], [exact_p])
    _, grouped = decode_attention(q.to(DEVICE), on(DEVICE, segments), START.to(DEVICE), 0.2, q_pos.to(DEVICE),
                                  return_weights=True, backend="triton")
    torch.testing.assert_close(torch.cat(grouped, -1), p.view(B, HKV, GROUP * 2, -1).mean(2), atol=1e-7, rtol=1e-5)


# --- the slot store through the kernel ------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("method", ["quant", "mix"])
def test_triton_slot_store_attention_matches_its_torch_path(method: str):
    """On the store a real bf16 decode built (mix after its first quantization), the kernel's output and
    per-head probabilities match the store's torch path (`slot_attention`), for every layer."""
    from arkv_bench.cache import make_cache
    from arkv_bench.generation import greedy_generate, left_pad
    from tests.conftest import prompt_ids, tiny_model

    model = tiny_model("llama").to(device=DEVICE, dtype=torch.bfloat16)
    rows = [prompt_ids(n, seed=40 + i)[0].tolist() for i, n in enumerate([150, 110])]
    ids, mask = left_pad(rows, 0, DEVICE)
    budget = {} if method == "quant" else {"cache_size": 64}
    cache = make_cache(method, model.config, window_size=16, attention_kernel="torch", **budget)
    greedy_generate(model, ids, mask, cache, 8, compile=False)
    g = torch.Generator().manual_seed(3)
    for layer in cache.layers:
        assert layer.pos_q is not None  # mix has quantized by now
        hkv, d = layer.keys.shape[1], layer.keys.shape[3]
        query = torch.randn(2, 2 * hkv, 1, d, generator=g).to(device=DEVICE, dtype=torch.bfloat16)
        layer.evicting = method == "mix"  # a step that scores, whatever the last step was
        want_out, want_p = layer.slot_attention(query, d ** -0.5)
        out, p = layer.kernel_attention(query, d ** -0.5)
        torch.testing.assert_close(out.float(), want_out.float(), **OUT_TOL)
        if method == "quant":  # scores nothing: no probabilities written
            assert p is None
            continue
        # the torch path rounds the Original slots' logits to bf16 (a bf16 matmul), the kernel keeps float32
        torch.testing.assert_close(p, want_p, atol=1e-4, rtol=2e-2)
