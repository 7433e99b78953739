"""Layer-major prefill: the same run, bit for bit, as the model's own chunk-by-chunk forward, holding
one layer's dense prompt at a time."""

from __future__ import annotations

import pytest

from arkv_bench.cache import METHODS, make_cache
from arkv_bench.generation import greedy_generate, left_pad, prefill
from arkv_bench.layer_major import applies
from tests.conftest import DEVICE, prompt_ids, tiny_model

W, NEW = 16, 10
SLOT_METHODS = ["mix", "origin", "h2o", "window", "snapkv", "pyramidkv", "adakv", "quant", "kivi"]


def build(method: str, model, budget: int = 48):
    options = {"cache_size": budget} if METHODS[method].budgeted else {}
    return make_cache(method, model.config, window_size=W, **options)


def batch_of_two():
    return left_pad([prompt_ids(130, seed=60)[0].tolist(), prompt_ids(97, seed=61)[0].tolist()], 0, DEVICE)


def run(model, method: str, chunk: int, layer_major: bool):
    ids, mask = batch_of_two()
    cache = build(method, model)
    return greedy_generate(model, ids, mask, cache, NEW, prefill_chunk=chunk,
                           run_prompt=lambda: prefill(model, ids, mask, cache, chunk, layer_major=layer_major))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("method", SLOT_METHODS)
@pytest.mark.parametrize("chunk", [0, 24])
def test_layer_major_equals_chunk_major(arch, method, chunk):
    """Tokens, kv bytes and every statistic (ARKV's OQ scores included) equal the model's own forward's."""
    model = tiny_model(arch)
    layered, chunked = run(model, method, chunk, True), run(model, method, chunk, False)
    assert layered.tokens == chunked.tokens
    assert layered.kv_bytes == chunked.kv_bytes
    assert layered.stats == chunked.stats
    assert chunked.stats["compressed"]


def test_layer_major_logits_equal(llama):
    ids, mask = batch_of_two()
    a = prefill(llama, ids, mask, build("mix", llama), 24, layer_major=True)
    b = prefill(llama, ids, mask, build("mix", llama), 24, layer_major=False)
    assert a.equal(b)


@pytest.mark.parametrize("layer_major,most", [(True, 1), (False, 4)])
def test_dense_layers_at_once(llama, monkeypatch, layer_major, most):
    """When a layer selects, the other layers hold at most what layer-major order promises: one dense
    layer (the selecting one) instead of all four."""
    seen: list[int] = []
    cache = build("window", llama)
    end_prefill = type(cache.layers[0]).end_prefill

    def counting(self, *args):
        seen.append(sum(1 for layer in cache.layers if layer.is_initialized and not layer.stored))
        return end_prefill(self, *args)

    monkeypatch.setattr(type(cache.layers[0]), "end_prefill", counting)
    ids, mask = batch_of_two()
    prefill(llama, ids, mask, cache, 24, layer_major=layer_major)
    assert len(seen) == 4 and max(seen) == most


def test_applies_only_where_the_forward_is_replayed(llama):
    assert applies(llama, build("mix", llama))
    assert not applies(llama, build("full", llama))  # the model's own cache: its own forward
    assert not applies(llama, build("akv", llama))  # not a slot store
    mistral = tiny_model("mistral")
    assert not applies(mistral, build("mix", mistral))


@pytest.mark.parametrize("method", ["mix", "snapkv", "pyramidkv", "adakv"])
def test_scoring_in_row_blocks_equals_one_block(monkeypatch, method):
    """The end of prefill scores large batches a few rows at a time (base.SCORE_ELEMENTS): one row per
    block gives the run of one block for the whole batch."""
    model = tiny_model("llama")
    whole = run(model, method, 24, True)
    monkeypatch.setattr("arkv_bench.cache.base.SCORE_ELEMENTS", 1)
    by_row = run(model, method, 24, True)
    assert by_row.tokens == whole.tokens and by_row.stats == whole.stats


@pytest.mark.skipif(DEVICE.type != "cuda", reason="the mask-free causal attention runs on CUDA in half precision")
def test_mask_free_prefill_in_bf16():
    """bf16 on CUDA, unpadded: the hook attends without the model's mask (attention.causal_attention). Its
    output matches a masked SDPA over repeated keys, and layer-major equals chunk-major bit for bit."""
    import torch

    from arkv_bench.cache.attention import causal_attention, repeat_kv

    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(2, h, n, 64, device=DEVICE, generator=g, dtype=torch.bfloat16)
               for h, n in ((8, 48), (2, 200), (2, 200)))
    allowed = torch.ones(48, 200, dtype=torch.bool, device=DEVICE).tril(200 - 48)
    expected = torch.nn.functional.scaled_dot_product_attention(q, repeat_kv(k, 4), repeat_kv(v, 4), attn_mask=allowed)
    assert (causal_attention(q, k, v, 64 ** -0.5) - expected.transpose(1, 2)).abs().max() < 2e-2
    model = tiny_model("llama").to(torch.bfloat16)
    ids = prompt_ids(130, seed=62, batch=2)
    mask = torch.ones_like(ids)
    runs = []
    for layer_major in (True, False):
        cache = build("mix", model)
        runs.append(greedy_generate(model, ids, mask, cache, NEW, prefill_chunk=24, compile=False, run_prompt=lambda:
                                    prefill(model, ids, mask, cache, 24, layer_major=layer_major)))
    assert runs[0].tokens == runs[1].tokens and runs[0].stats == runs[1].stats


def test_causal_attention_aligns_to_the_last_query():
    """The mask-free attention used on CUDA: the last q of n tokens, each seeing the keys up to its own
    position, GQA without repeated keys; here on the CPU (where SDPA materialises the same mask) in fp32."""
    import torch

    from arkv_bench.cache.attention import causal_attention, repeat_kv

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, n, 32, generator=g) for h, n in ((8, 48), (2, 200), (2, 200)))
    allowed = torch.ones(48, 200, dtype=torch.bool).tril(200 - 48)
    expected = torch.nn.functional.scaled_dot_product_attention(q, repeat_kv(k, 4), repeat_kv(v, 4), attn_mask=allowed)
    assert torch.allclose(causal_attention(q, k, v, 32 ** -0.5), expected.transpose(1, 2), atol=1e-5)
