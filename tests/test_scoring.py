"""ARKV's statistics against hand computations, and the quantizers against their format bounds."""

from __future__ import annotations

import math

import pytest
import torch

from arkv_bench.cache import make_cache
from arkv_bench.cache.arkv import PAPER
from arkv_bench.cache.quantize import (fp8_dequantize, fp8_quantize, int_dequantize, int_quantize, pack,
                                       unpack)
from arkv_bench.cache.scoring import entropy, heavy_hitter_score, kurtosis, oq_ratios, oq_score, variance

# Two window queries over two keys: [[0.5, 0.5], [1.0, 0.0]].
A = torch.tensor([[[[0.5, 0.5], [1.0, 0.0]]]])


def test_entropy_variance_kurtosis_by_hand():
    # H = -(0.5 ln 0.5 + 0.5 ln 0.5 + 1 ln 1 + 0) = ln 2
    assert entropy(A).item() == pytest.approx(math.log(2), abs=1e-6)
    # per key, the unbiased variance of (0.5, 1.0) and of (0.5, 0.0) is 0.125: V = 0.25
    assert variance(A).item() == pytest.approx(0.25, abs=1e-7)
    # per key the deviations are +-0.25: m2 = 1/16, m4 = 1/256, m4 / m2^2 = 1: K = 2
    assert kurtosis(A).item() == pytest.approx(2.0, abs=1e-6)


def test_kurtosis_clamps_m2_for_constant_keys():
    constant = torch.full((1, 1, 3, 4), 0.25)
    assert kurtosis(constant).item() == 0.0  # m4 = 0, m2 clamped at 1e-8: no division by zero


def test_oq_score_by_hand():
    t1, t2, t3 = PAPER["tau1"], PAPER["tau2"], PAPER["tau3"]
    expected = math.log(2) ** (1 / t1) * 0.25 ** (1 / t2) * 2.0 ** (1 / t3)
    assert oq_score(A, t1, t2, t3).item() == pytest.approx(expected, rel=1e-6)


def test_ratios_use_the_max_over_all_layers():
    scores = torch.tensor([[1.0], [4.0], [2.0]])  # layer 0 first: a running max would give it ratio 1
    assert oq_ratios(scores).flatten().tolist() == [0.25, 1.0, 0.5]


def test_origin_budgets_from_ratios(llama):
    cache = make_cache("mix", llama.config, cache_size=132, window_size=32)
    for layer, oq in zip(cache.layers, [1.0, 4.0, 2.0, 3.0]):
        layer.oq = torch.tensor([oq])
    cache._assign_origin_budgets()
    assert [layer.origin_budget.item() for layer in cache.layers] == [25, 100, 50, 75]  # round(r (132 - 32))


def test_heavy_hitter_score_by_hand():
    # two query heads sharing one KV head, two queries, five keys
    a = torch.tensor([[[[0.0, 1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0, 0.0]],
                       [[0.0, 0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0]]]])
    # head 0: mean (0,1,0,0,0), var 0; head 1: mean (0,0,0,0,.5), unbiased var (0,0,0,0,.5); gamma = 2
    # s0 = (0,1,0,0,0), s1 = (0,0,0,0,1.5); average pool of 3 with zero padding:
    # s0 -> (1/3, 1/3, 1/3, 0, 0), s1 -> (0, 0, 0, .5, .5); group mean -> (1/6, 1/6, 1/6, 1/4, 1/4)
    got = heavy_hitter_score(a, gamma=2.0, pooling="avg", kernel_size=3, kv_heads=1)
    assert got.flatten().tolist() == pytest.approx([1 / 6, 1 / 6, 1 / 6, 0.25, 0.25], abs=1e-6)
    # max pooling keeps the peaks at full height: s0 -> (1,1,1,0,0), s1 -> (0,0,0,1.5,1.5)
    got = heavy_hitter_score(a, gamma=2.0, pooling="max", kernel_size=3, kv_heads=1)
    assert got.flatten().tolist() == pytest.approx([0.5, 0.5, 0.5, 0.75, 0.75], abs=1e-6)


def test_fp8_round_trip_within_e4m3_bound():
    x = torch.randn(2, 3, 50, 64) * torch.logspace(-3, 2, 50).view(1, 1, 50, 1)
    codes, scale = fp8_quantize(x)
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == (2, 3, 50, 1)
    err = (fp8_dequantize(codes, scale, torch.float32) - x).abs()
    # 3 mantissa bits: each value within 2^-4 of itself, so within 2^-4 of the token's max magnitude
    assert (err <= 2**-4 * x.abs().amax(-1, keepdim=True) + 1e-12).all()


@pytest.mark.parametrize("bits", [2, 4])
def test_int_round_trip_within_half_a_step(bits):
    x = torch.randn(2, 3, 64, 32) * 3 + 1
    codes, scale, zero = int_quantize(x, bits, dim=-1)
    assert int(codes.max()) <= 2**bits - 1
    err = (int_dequantize(codes, scale, zero, torch.float32) - x).abs()
    assert (err <= scale / 2 + 1e-5).all()


@pytest.mark.parametrize("bits", [2, 4])
def test_packing_is_reversible_and_small(bits):
    codes = torch.randint(0, 2**bits, (2, 3, 7, 64), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape[-1] == 64 * bits // 8
    assert torch.equal(unpack(packed, bits), codes)
