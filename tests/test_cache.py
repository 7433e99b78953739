"""The cache methods against the HF reference, their budgets, positions and bytes."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from arkv_bench.cache import METHODS, make_cache
from arkv_bench.cache.base import TokenLayer
from arkv_bench.generation import extend, greedy_generate, left_pad, prefill
from tests.conftest import ARCHS, DEVICE, prompt_ids, tiny_model

EVICTING = ["mix", "origin", "h2o", "window"]


def generate(model, ids, cache, n=16):
    out = model.generate(ids, past_key_values=cache, max_new_tokens=n, do_sample=False,
                         return_dict_in_generate=True, output_logits=True)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_full_equals_dynamic_cache(arch):
    model = tiny_model(arch)
    ids = prompt_ids(120)
    ref_tokens, ref_logits = generate(model, ids, DynamicCache(config=model.config))
    tokens, logits = generate(model, ids, make_cache("full", model.config))
    assert torch.equal(tokens, ref_tokens)
    assert (logits - ref_logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("method", EVICTING)
def test_evicting_methods_with_room_equal_full(arch, method):
    model = tiny_model(arch)
    ids = prompt_ids(100)
    ref_tokens, _ = generate(model, ids, make_cache("full", model.config))
    tokens, _ = generate(model, ids, make_cache(method, model.config, cache_size=100 + 16))
    assert torch.equal(tokens, ref_tokens)


def teacher_forced_logits(model, ids, forced, cache):
    """Logits of every step when the cache is fed `forced` tokens one at a time."""
    mask = torch.ones_like(ids)
    steps = [prefill(model, ids, mask, cache)]
    for t in range(forced.shape[1] - 1):
        logits, mask = extend(model, forced[:, t:t + 1], mask, cache)
        steps.append(logits[:, -1])
    return torch.stack(steps, 1)


def test_quantizers_stay_within_their_format_bound(llama):
    ids = prompt_ids(200)
    forced, full_logits = generate(llama, ids, make_cache("full", llama.config), n=24)
    scale = full_logits.abs().max().item()
    errors = {}
    for label, method, options in [("fp8", "quant", {}), ("int4", "kivi", {"bits": 4, "residual_length": 32}),
                                   ("int2", "kivi", {"bits": 2, "residual_length": 32})]:
        logits = teacher_forced_logits(llama, ids, forced, make_cache(method, llama.config, **options))
        errors[label] = (logits - full_logits).abs().max().item()
    # Bound: a logit moves by at most (the format's worst relative error of one cached value) x (the logit scale).
    # FP8 e4m3 keeps 3 mantissa bits: relative error <= 2^-4. A b-bit min/max code errs by <= range / (2 (2^b - 1))
    # and a group's range is <= 2 max|x|, so relative to max|x|: 1/15 at 4 bits, 1/3 at 2 bits.
    assert 0 < errors["fp8"] <= 2**-4 * scale
    assert 0 < errors["int4"] <= scale / 15
    assert 0 < errors["int2"] <= scale / 3
    assert errors["fp8"] < errors["int4"] < errors["int2"]


def held_live(layer) -> torch.Tensor:
    """Tokens held per (row, head), Original and Quantized."""
    count = layer.live(layer.pos).sum(-1)
    if getattr(layer, "pos_q", None) is not None:
        count = count + layer.live(layer.pos_q).sum(-1)
    return count


def check_budget(cache, cache_size, window):
    for layer in cache.layers:
        getattr(layer, "settle", lambda: None)()  # as the cache does before reading (mix's first event rebuilds)
        assert held_live(layer).max().item() <= cache_size
        recent = torch.arange(layer.seen - window, layer.seen, dtype=layer.pos.dtype, device=layer.pos.device)
        for row in layer.pos.reshape(-1, layer.pos.shape[-1]):
            assert torch.isin(recent, row).all(), "the window must be held at full precision"


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("method", EVICTING)
def test_budget_held_after_prefill_and_every_step(arch, method):
    model = tiny_model(arch)
    ids = prompt_ids(150)
    cache = make_cache(method, model.config, cache_size=64, window_size=16)
    mask = torch.ones_like(ids)
    token = prefill(model, ids, mask, cache).argmax(-1, keepdim=True)
    check_budget(cache, 64, 16)
    for _ in range(12):
        logits, mask = extend(model, token, mask, cache)
        token = logits[:, -1].argmax(-1, keepdim=True)
        check_budget(cache, 64, 16)
    assert cache.compressed


def test_mix_quantizes_once_decoding_starts(llama):
    ids = prompt_ids(150)
    cache = make_cache("mix", llama.config, cache_size=64, window_size=16)
    mask = torch.ones_like(ids)
    token = prefill(llama, ids, mask, cache).argmax(-1, keepdim=True)
    assert sum(layer.quantized_count() for layer in cache.layers) == 0, "the paper only evicts at prefill"
    extend(llama, token, mask, cache)
    cache.settle()  # the first event's rebuild waits for the cache's next look at its stores
    ratios = [layer.ratio.item() for layer in cache.layers]
    assert max(ratios) == 1.0 and min(ratios) < 1.0
    quantized = [layer.quantized_count() for layer in cache.layers]
    for ratio, q, layer in zip(ratios, quantized, cache.layers):
        assert q == (64 - 16) - round(ratio * (64 - 16)), "Original budget = round(r_l (C - W)), the rest Quantized"
    assert sum(quantized) > 0


def test_origin_never_quantizes(llama):
    ids = prompt_ids(150)
    cache = make_cache("origin", llama.config, cache_size=64, window_size=16)
    greedy_generate(llama, ids, torch.ones_like(ids), cache, max_new_tokens=8)
    assert cache.compressed and all(layer.quantized_count() == 0 for layer in cache.layers)


def tensors_held(obj) -> int:
    """Bytes of every tensor reachable from a layer's attributes (dicts included): the independent count."""
    total = 0
    for value in vars(obj).values():
        values = value.values() if isinstance(value, dict) else [value]
        total += sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))
    return total


@pytest.mark.parametrize("method", list(METHODS))
def test_kv_bytes_counts_every_held_tensor(llama, method):
    ids = prompt_ids(512)
    options = {} if not METHODS[method].budgeted else {"cache_size": 64}
    if method == "akv":  # no cache_size: its device budget is hot + warm
        options = {"hot_budget": 48, "warm_budget": 16}
    cache = make_cache(method, llama.config, **options)
    greedy_generate(llama, ids, torch.ones_like(ids), cache, max_new_tokens=4)
    # kv_bytes(): what the model's device holds; host_bytes(): what a method keeps in CPU memory (AKV's cold tier)
    assert cache.kv_bytes() + cache.host_bytes() == sum(tensors_held(layer) for layer in cache.layers)
    ratio = cache.kv_bytes() / cache.full_kv_bytes()
    # full-static holds the slots reserved for the generation: one more than the tokens seen here
    limit = {"full": 1.0 + 1e-9, "full-static": 1.01, "quant": 0.60, "kivi": 0.60}.get(method, 0.25)
    assert ratio <= limit, f"{method} holds {ratio:.1%} of the full cache"


def test_full_kv_bytes_is_the_dynamic_cache_size(llama):
    ids = prompt_ids(77)
    cache = make_cache("full", llama.config)
    greedy_generate(llama, ids, torch.ones_like(ids), cache, max_new_tokens=5)
    cfg = llama.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    expected = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (77 + 4) * head_dim * 4
    assert cache.kv_bytes() == cache.full_kv_bytes() == expected


def test_positions_after_eviction_are_true_positions(llama):
    """`window` evicts the same tokens in every layer and head, so the full cache can reproduce its decoding by
    masking exactly those tokens out. That only matches if the compressed cache gives new tokens their true RoPE
    positions (a cache that used its held length as the position would differ)."""
    n, size, sinks = 100, 48, 4
    ids = prompt_ids(n)
    compressed = make_cache("window", llama.config, cache_size=size, window_size=8, n_sink=sinks)
    reference = make_cache("full", llama.config)
    mask = torch.ones_like(ids)
    token = prefill(llama, ids, mask, compressed).argmax(-1, keepdim=True)
    prefill(llama, ids, mask, reference)
    for step in range(10):
        seen = n + step
        logits, mask = extend(llama, token, mask, compressed)
        held = torch.zeros(1, seen + 1, dtype=torch.long, device=DEVICE)
        held[:, :sinks] = 1
        held[:, seen + 1 - (size - sinks) - 1:] = 1  # the cache held size tokens, then took the new one
        positions = torch.tensor([[seen]], device=DEVICE)
        ref = llama(input_ids=token, attention_mask=held, position_ids=positions, past_key_values=reference).logits
        assert (logits - ref).abs().max().item() < 1e-5
        token = logits[:, -1].argmax(-1, keepdim=True)


@pytest.mark.parametrize("method", ["full", "mix"])
def test_batched_rows_equal_rows_alone(llama, method):
    lengths = [150, 90, 120]
    rows = [prompt_ids(n, seed=10 + i)[0].tolist() for i, n in enumerate(lengths)]
    options = {"cache_size": 64, "window_size": 16} if method == "mix" else {}
    alone = []
    for row in rows:
        ids, mask = left_pad([row], 0, DEVICE)
        alone.append(greedy_generate(llama, ids, mask, make_cache(method, llama.config, **options), 12).tokens[0])
    ids, mask = left_pad(rows, 0, DEVICE)
    batched = greedy_generate(llama, ids, mask, make_cache(method, llama.config, **options), 12).tokens
    assert batched == alone


@pytest.mark.parametrize("name, options, message", [
    ("nope", {}, "valid methods: full, mix"),
    ("mix", {"cache_size": 32, "window_size": 32}, "larger than window_size"),
    ("h2o", {"cache_size": -5}, "non-negative"),
    ("kivi", {"bits": 3}, "bits must be one of 2, 4"),
    ("mix", {"pooling": "median"}, "pooling must be one of avg, max"),
    ("mix", {"kernel_size": 4}, "odd"),
    ("window", {"bits": 4}, "its options: cache_size, window_size, n_sink"),
    ("kivi", {"group_size": 32, "residual_length": 16}, "residual_length must be"),
])
def test_invalid_options_name_the_valid_choices(llama, name, options, message):
    with pytest.raises(ValueError, match=message):
        make_cache(name, llama.config, **options)


def test_compressing_without_the_hook_is_an_error():
    model = tiny_model("llama")
    model.set_attn_implementation("sdpa")
    ids = prompt_ids(80)
    with pytest.raises(RuntimeError, match="prepare_model"):
        model.generate(ids, past_key_values=make_cache("mix", model.config, cache_size=40), max_new_tokens=3)


def test_layers_are_token_layers_except_full(llama):
    for name in METHODS:
        options = {"cache_size": 64} if METHODS[name].budgeted else {}
        layers = make_cache(name, llama.config, **options).layers
        assert len(layers) == llama.config.num_hidden_layers
        assert all(isinstance(layer, TokenLayer) for layer in layers) == (name not in ("full", "full-static"))


@pytest.mark.parametrize("method", ["mix", "origin", "h2o", "window"])
def test_slack_evicts_in_batches_and_holds_the_budget(llama, method):
    """slack=s frees s extra slots per eviction, so evictions happen every s + 1 steps and the layer
    never holds more than cache_size tokens."""
    ids = prompt_ids(150)
    cache = make_cache(method, llama.config, cache_size=64, window_size=16, slack=8)
    mask = torch.ones_like(ids)
    token = prefill(llama, ids, mask, cache).argmax(-1, keepdim=True)
    held = [held_live(cache.layers[0]).max().item()]
    for _ in range(18):
        logits, mask = extend(llama, token, mask, cache)
        token = logits[:, -1].argmax(-1, keepdim=True)
        check_budget(cache, 64, 16)
        held.append(held_live(cache.layers[0]).max().item())
    assert held[:10] == list(range(56, 65)) + [56]
    assert held[10:] == list(range(57, 65)) + [56]
