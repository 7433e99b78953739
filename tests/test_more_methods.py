"""SnapKV, PyramidKV, AdaKV (and `mix` with adaptive head budgets), AKV: the shared checks, and each one's own."""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import pytest
import torch

from arkv_bench.cache import make_cache
from arkv_bench.cache.adakv import adaptive_allocation
from arkv_bench.cache.akv import catch_up
from arkv_bench.cache.pyramidkv import pyramid_budgets
from arkv_bench.generation import extend, greedy_generate, left_pad, prefill
from tests.conftest import ARCHS, DEVICE, prompt_ids, tiny_model
from tests.test_cache import check_budget, generate, held_live, tensors_held

C, W, STEPS = 64, 16, 12
AKV_SMALL = {"hot_budget": 40, "warm_budget": 24, "n_anchors": 4, "promote_interval": 3}
# label -> (method, options with a small budget)
VARIANTS = {
    "snapkv": ("snapkv", {"cache_size": C}),
    "snapkv-decode": ("snapkv", {"cache_size": C, "decode_compress": True}),
    "pyramidkv": ("pyramidkv", {"cache_size": C}),
    "adakv": ("adakv", {"cache_size": C}),
    "mix-adaptive": ("mix", {"cache_size": C, "head_budget": "adaptive"}),
    "akv": ("akv", AKV_SMALL),
}


def build(label: str, model, huge: bool = False):
    method, options = VARIANTS[label]
    if huge:  # room for every token of the test
        options = {**options, **({"hot_budget": 10_000} if method == "akv" else {"cache_size": 10_000})}
    return make_cache(method, model.config, window_size=W, **options)




@functools.lru_cache(maxsize=None)
def model_of(arch: str):
    return tiny_model(arch)


@functools.lru_cache(maxsize=None)
def full_tokens(arch: str) -> torch.Tensor:
    model = model_of(arch)
    return generate(model, prompt_ids(100), make_cache("full", model.config))[0]


# --- the shared checks --------------------------------------------------------------------------

@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("label", ["snapkv", "pyramidkv", "adakv", "mix-adaptive", "akv"])
def test_huge_budget_equals_full(arch, label):
    model = model_of(arch)
    tokens, _ = generate(model, prompt_ids(100), build(label, model, huge=True))
    assert torch.equal(tokens, full_tokens(arch))


def steps_of(model, cache, n_prompt=150, steps=STEPS):
    """Prefill, then decode `steps` tokens greedily; yields after prefill (0) and after every step."""
    ids = prompt_ids(n_prompt)
    mask = torch.ones_like(ids)
    token = prefill(model, ids, mask, cache).argmax(-1, keepdim=True)
    yield 0
    for step in range(1, steps + 1):
        logits, mask = extend(model, token, mask, cache)
        token = logits[:, -1].argmax(-1, keepdim=True)
        yield step


def check_akv(cache, hot, warm):
    for layer in cache.layers:
        check_budget(SimpleNamespace(layers=[layer]), hot, W)  # hot holds the window at full precision
        anchors = torch.arange(layer.n_anchors, dtype=layer.pos.dtype, device=DEVICE)
        assert all(torch.isin(anchors, row).all() for row in layer.pos.reshape(-1, layer.pos.shape[-1]))
        assert layer.warm["pos"].shape[-1] <= warm
        tiers = torch.cat([layer.pos.cpu(), layer.warm["pos"].cpu(), layer.cold["pos"]], dim=2)
        for row in tiers.reshape(-1, tiers.shape[-1]):  # every token seen, in exactly one tier
            assert torch.equal(row.sort().values, torch.arange(layer.seen, dtype=row.dtype))


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("label", list(VARIANTS))
def test_budget_held_after_prefill_and_every_step(arch, label):
    model = model_of(arch)
    cache = build(label, model)
    for step in steps_of(model, cache):
        if label == "akv":
            check_akv(cache, AKV_SMALL["hot_budget"], AKV_SMALL["warm_budget"])
            continue
        growth = step if label in ("snapkv", "pyramidkv", "adakv") else 0  # no compression while decoding
        if label in ("adakv", "mix-adaptive"):  # a layer's budget is C x heads, split unevenly
            for layer in cache.layers:
                heads = layer.pos.shape[1]
                assert held_live(layer).sum(-1).max().item() <= (C + growth) * heads
                check_budget(SimpleNamespace(layers=[layer]), (C + growth) * heads, W)
        else:
            for layer in cache.layers:
                check_budget(SimpleNamespace(layers=[layer]), layer.cache_size + growth, W)
    assert cache.compressed


@pytest.mark.parametrize("label", list(VARIANTS))
def test_kv_bytes_counts_every_held_tensor(label):
    model = model_of("llama")
    ids = prompt_ids(300)
    cache = build(label, model)
    greedy_generate(model, ids, torch.ones_like(ids), cache, max_new_tokens=8)
    held = sum(tensors_held(layer) for layer in cache.layers)
    if label == "akv":  # the cold tier is in CPU memory: host_bytes(), not kv_bytes()
        cold = sum(tensors_held(SimpleNamespace(**layer.cold)) for layer in cache.layers)
        assert cold > 0 and cache.host_bytes() == cold == cache.stats()["cpu_bytes"]
        held -= cold
    assert cache.kv_bytes() == held
    assert cache.kv_bytes() / cache.full_kv_bytes() <= 0.4


@pytest.mark.parametrize("label", ["snapkv-decode", "pyramidkv", "adakv", "mix-adaptive", "akv"])
def test_batched_rows_equal_rows_alone(label):
    model = model_of("llama")
    rows = [prompt_ids(n, seed=10 + i)[0].tolist() for i, n in enumerate([150, 90, 120])]
    alone = [greedy_generate(model, *left_pad([row], 0, DEVICE), build(label, model), 12).tokens[0] for row in rows]
    assert greedy_generate(model, *left_pad(rows, 0, DEVICE), build(label, model), 12).tokens == alone


# --- PyramidKV -----------------------------------------------------------------------------------

@pytest.mark.parametrize("cache_size, window, layers, beta", [
    (64, 16, 4, 20), (1024, 32, 30, 20), (512, 32, 32, 20), (256, 32, 30, 2), (100, 8, 7, 1.5), (48, 16, 1, 20)])
def test_pyramid_budgets_decrease_and_average_to_cache_size(cache_size, window, layers, beta):
    budgets = pyramid_budgets(cache_size, window, layers, beta)
    assert len(budgets) == layers and sum(budgets) == cache_size * layers
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))
    assert all(b >= window for b in budgets)
    if layers > 1:
        assert budgets[0] > budgets[-1]
        room = cache_size - window
        assert budgets[-1] - window == pytest.approx(room / beta, abs=1)  # PyramidKV's top: room / beta


def test_pyramidkv_layers_get_their_budgets():
    model = model_of("llama")
    cache = make_cache("pyramidkv", model.config, cache_size=C, window_size=W)
    budgets = [layer.cache_size for layer in cache.layers]
    assert budgets == pyramid_budgets(C, W, model.config.num_hidden_layers, 20)
    assert [layer["budget"] for layer in cache.stats()["layers"]] == budgets


# --- AdaKV ---------------------------------------------------------------------------------------

SCORES = torch.tensor([[[10.0, 9.0, 8.0, 7.0, 6.0, 5.0],  # head 0: everything above the other heads
                        [0.50, 0.45, 0.40, 0.35, 0.30, 0.25],
                        [0.32, 0.22, 0.12, 0.02, float("-inf"), float("-inf")]]])  # two non-candidates
SHARE = torch.tensor([[3, 3, 3]])  # uniform: 3 per head, 9 in the layer


@pytest.mark.parametrize("alpha, kept", [
    (0.0, [6, 3, 0]),  # pure global top 9: head 0's six, then 0.50, 0.45, 0.40
    (1 / 3, [6, 2, 1]),  # each head first keeps its best 1; the other 6 go to the best remaining pairs
    (0.5, [5, 2, 2]),  # ceil(1.5) = 2 reserved per head; 3 more: 9, 8, 7 of head 0
    (1.0, [3, 3, 3]),  # the whole share reserved: uniform, SnapKV
])
def test_adakv_allocation_takes_global_top_pairs_with_the_safeguard(alpha, kept):
    keep = adaptive_allocation(SCORES, SHARE, alpha)
    assert keep.sum(-1).tolist() == [kept]
    assert keep.sum().item() == 9
    for head, n in enumerate(kept):  # a head's kept slots are its own best ones
        assert keep[0, head, :n].all() and not keep[0, head, n:].any()
    assert min(kept) >= math.ceil(alpha * 3 - 1e-6)


def test_adakv_allocation_never_picks_non_candidates():
    keep = adaptive_allocation(SCORES[:, [2]], torch.tensor([[6]]), 0.0)
    assert keep.tolist() == [[[True, True, True, True, False, False]]]


def test_adakv_heads_differ_padding_is_counted_and_never_attended():
    model = model_of("llama")
    ids = prompt_ids(300)
    cache = make_cache("adakv", model.config, cache_size=C, window_size=W, alpha=0.2)
    greedy_generate(model, ids, torch.ones_like(ids), cache, max_new_tokens=4)
    stats = cache.stats()
    padding = sum(layer["padding_slots"] for layer in stats["layers"])
    assert padding > 0, "with adaptive budgets some heads hold fewer tokens than others"
    for layer in cache.layers:
        counts = layer.live(layer.pos).sum(-1)
        assert counts.sum().item() == (C + 3) * counts.shape[1]  # the layer's budget, +3 decoded tokens per head
        assert counts.min().item() >= math.ceil(0.2 * (C - W)) + W  # the safeguard (and the window)
        # padding slots: position -1, outside every head's live set, so attention masks them out
        assert (layer.pos[~layer.live(layer.pos)] == -1).all()
        probs = layer.probs(torch.randn(1, 4, 1, 32, device=DEVICE), layer.keys, 1.0)
        assert (probs.view(1, 2, 2, 1, -1)[~layer.live(layer.pos).view(1, 2, 1, 1, -1).expand(1, 2, 2, 1, -1)] == 0).all()
    slot = 2 * 32 * 4 + 4  # keys + values (fp32, head_dim 32) + an int32 position
    assert stats["kv_bytes_unpadded"] == stats["kv_bytes"] - padding * slot


# --- AKV -----------------------------------------------------------------------------------------

def test_akv_catch_up_equals_the_skipped_updates():
    decay, a, imp = 0.9, 0.3, 2.0
    stepwise = imp
    for _ in range(5):
        stepwise = decay * stepwise + a
    kept, gained = catch_up(decay, torch.tensor(5))
    assert (kept * imp + gained * a).item() == pytest.approx(stepwise)
    kept, gained = catch_up(1.0, torch.tensor(5))
    assert (kept * imp + gained * a).item() == pytest.approx(imp + 5 * a)


def test_akv_pools_over_neighbouring_positions_not_slots():
    layer = make_cache("akv", model_of("llama").config, kernel_size=3).layers[0]
    pos = torch.tensor([[[4, 0, 2, 3, 1]]])  # tiers hold tokens out of position order
    logits = torch.full((1, 1, 1, 5), -1e4)
    logits[..., 3] = 0.0  # the query attends to position 3 only
    received = layer._received(logits, logits.logsumexp(-1, keepdim=True), pos)
    assert received.tolist() == [[[1.0, 0.0, 1.0, 1.0, 0.0]]]  # positions 2, 3, 4 (max pooling, kernel 3)


def test_akv_device_bytes_flat_within_budgets_while_cpu_bytes_grow():
    model = model_of("llama")
    cache = build("akv", model)
    cfg = model.config
    hot, warm, groups = AKV_SMALL["hot_budget"], AKV_SMALL["warm_budget"], 32 // 32
    per_head = hot * (2 * 32 * 4 + 4 + 4) + warm * (2 * (32 * 4 // 8 + 2 * 4 * groups) + 4 + 4)
    budget = cfg.num_hidden_layers * (cfg.num_key_value_heads * per_head + 4)  # + each layer's `start`
    cpu = []
    for step in steps_of(model, cache, n_prompt=200):
        assert cache.kv_bytes() == budget  # hot + warm, full
        cpu.append(cache.host_bytes())
        counts = [cache.layers[0].tier_counts()[t] for t in ("hot", "warm", "cold")]
        assert counts == [hot, warm, 200 + step - hot - warm]
    assert all(a < b for a, b in zip(cpu, cpu[1:]))
    stats = cache.stats()
    assert stats["cpu_bytes"] == cpu[-1] and stats["demotions"] > 0
    assert all(layer["evicted"] == 0 for layer in stats["layers"])


def test_akv_forced_attention_promotes_a_cold_token_to_hot():
    model = model_of("llama")
    cache = make_cache("akv", model.config, window_size=W, **{**AKV_SMALL, "promote_interval": 1})
    ids = prompt_ids(200)
    mask = torch.ones_like(ids)
    token = prefill(model, ids, mask, cache).argmax(-1, keepdim=True)
    layer = cache.layers[1]
    slot = 5
    target = layer.cold["pos"][0, 0, slot].item()
    assert target not in layer.pos[0, 0].tolist() and target not in layer.warm["pos"][0, 0].tolist()
    scorer = layer.cold_logits

    def forced(query, scaling):  # a hand-made score: every query head of KV head 0 attends to the target
        logits = scorer(query, scaling)
        logits[:, :2, :, slot] = 1e4
        return logits

    layer.cold_logits = forced
    extend(model, token, mask, cache)
    assert target in layer.pos[0, 0].tolist(), "the token is hot again"
    assert target not in layer.cold["pos"][0, 0].tolist() and layer.promotions >= 1
    check_akv(cache, AKV_SMALL["hot_budget"], AKV_SMALL["warm_budget"])


# --- options -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, options, message", [
    ("pyramidkv", {"beta": 0.5}, "beta must be at least 1"),
    ("adakv", {"alpha": 1.5}, "alpha must be in"),
    ("snapkv", {"decode_compress": "yes"}, "decode_compress must be one of"),
    ("mix", {"head_budget": "greedy"}, "head_budget must be one of uniform, adaptive"),
    ("akv", {"hot_budget": 40, "n_anchors": 16}, "hot_budget must be at least"),
    ("akv", {"cold_budget": 10.5}, "cold_budget must be"),
    ("akv", {"warm_bits": 3}, "warm_bits must be one of 2, 4"),
    ("akv", {"bits": 4}, "no option bits"),
])
def test_invalid_options(name, options, message):
    with pytest.raises(ValueError, match=message):
        make_cache(name, model_of("llama").config, **options)
