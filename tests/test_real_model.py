"""End-to-end on the real embedded model (SmolLM2-135M-Instruct): the needle is found or lost."""

from __future__ import annotations

import pytest
import torch

from arkv_bench.cache import make_cache
from arkv_bench.generation import greedy_generate
from arkv_bench.models import load_model
from arkv_bench.suites.passkey import make_passkey_samples

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedded():
    model, tokenizer, _ = load_model(None, device="cpu", attn_implementation="arkv")
    return model, tokenizer


def answer(embedded, prompt: str, method: str, **options) -> tuple[str, object]:
    model, tokenizer = embedded
    ids = torch.tensor([tokenizer(prompt).input_ids])
    cache = make_cache(method, model.config, **options)
    gen = greedy_generate(model, ids, torch.ones_like(ids), cache, 12, [tokenizer.eos_token_id])
    return tokenizer.decode(gen.tokens[0], skip_special_tokens=True), cache


def test_full_finds_the_needle_and_a_small_window_loses_it(embedded):
    sample = make_passkey_samples(embedded[1], [1500], [0.5], seed=3, chat_template=False)[0]
    assert abs(sample.prompt_tokens - 1500) <= 75
    full, full_cache = answer(embedded, sample.prompt, "full")
    assert sample.key in full
    windowed, window_cache = answer(embedded, sample.prompt, "window", cache_size=128)
    assert sample.key not in windowed
    assert window_cache.compressed and window_cache.kv_bytes() < 0.15 * full_cache.kv_bytes()
