"""AKV's demotion policies: importance (the default) against the FIFO baseline, and the pinned recent tokens."""

from __future__ import annotations

import pytest
import torch

from arkv_bench.cache import make_cache
from tests.test_more_methods import AKV_SMALL, W, check_akv, model_of, steps_of

HOT, WARM, ANCHORS = AKV_SMALL["hot_budget"], AKV_SMALL["warm_budget"], AKV_SMALL["n_anchors"]


def akv(**options):
    return make_cache("akv", model_of("llama").config, window_size=W, **{**AKV_SMALL, **options})


def tier_sets(layer) -> list[tuple[set[int], set[int], set[int]]]:
    """(hot, warm, cold) positions of every (row, head)."""
    hot, warm, cold = (t.reshape(-1, t.shape[-1]).tolist() for t in (layer.pos, layer.warm["pos"], layer.cold["pos"]))
    return [(set(h), set(w), set(c)) for h, w, c in zip(hot, warm, cold)]


def test_fifo_demotes_strictly_by_age():
    cache = akv(demotion="fifo")
    for _ in steps_of(model_of("llama"), cache):
        check_akv(cache, HOT, WARM)
        for layer in cache.layers:
            seen = layer.seen
            recent = seen - (HOT - ANCHORS)  # the first position still hot after the anchors
            expected = (set(range(ANCHORS)) | set(range(recent, seen)), set(range(recent - WARM, recent)),
                        set(range(ANCHORS, recent - WARM)))
            assert all(sets == expected for sets in tier_sets(layer))
            assert layer.promotions == 0 and not layer.imp.any()  # nothing scored, nothing promoted


def test_fifo_cold_budget_evicts_the_oldest():
    cache = akv(demotion="fifo", cold_budget=50)
    for _ in steps_of(model_of("llama"), cache):
        for layer in cache.layers:
            recent = layer.seen - (HOT - ANCHORS)
            cold = set(range(recent - WARM - 50, recent - WARM))
            assert all(c == cold for _, _, c in tier_sets(layer))
    stats = cache.stats()
    assert all(layer["evicted"] == layer["seen"] - HOT - WARM - 50 for layer in stats["layers"])


def test_importance_keeps_an_attended_old_token_hot_where_fifo_demotes_it():
    target = 20  # neither an anchor nor recent: FIFO sends it to cold at prefill
    kept = {}
    for demotion in ("importance", "fifo"):
        cache = akv(demotion=demotion)
        for layer in cache.layers:
            scorer = layer._received

            def forced(logits, lse, pos, scorer=scorer):  # a hand-made score: every query attends to the target
                return torch.where(pos == target, 1.0, scorer(logits, lse, pos) * 0)

            layer._received = forced
        for _ in steps_of(model_of("llama"), cache):
            check_akv(cache, HOT, WARM)
        kept[demotion] = [all(target in hot for hot, _, _ in tier_sets(layer)) for layer in cache.layers]
    assert all(kept["importance"]) and not any(kept["fifo"])


def test_importance_and_fifo_differ_on_a_real_prompt_and_both_hold_budgets():
    model = model_of("llama")
    hot = {}
    for demotion in ("importance", "fifo"):
        cache = akv(demotion=demotion)
        for _ in steps_of(model, cache):
            check_akv(cache, HOT, WARM)
        hot[demotion] = [tier_sets(layer) for layer in cache.layers]
        assert cache.stats()["demotions"] > 0
    assert hot["importance"] != hot["fifo"]


def test_protect_recent_pins_that_many_recent_tokens_hot():
    cache = akv(protect_recent=30)
    for _ in steps_of(model_of("llama"), cache):
        for layer in cache.layers:
            recent = set(range(layer.seen - 30, layer.seen))
            assert all(recent <= hot for hot, _, _ in tier_sets(layer))


@pytest.mark.parametrize("options, message", [
    ({"demotion": "lru"}, "demotion must be one of importance, fifo"),
    ({"protect_recent": 37}, r"hot_budget must be at least n_anchors \+ protect_recent \(41\)"),
    ({"protect_recent": -1}, "protect_recent must be a token count"),
])
def test_invalid_demotion_options(options, message):
    with pytest.raises(ValueError, match=message):
        akv(**options)


def test_cli_types_the_demotion_options():
    from arkv_bench.options import build_options

    opts = build_options({"quant_type": "akv"}, method_option=["protect_recent=20", "demotion=fifo"])
    assert opts.method_options == {"protect_recent": 20, "demotion": "fifo"}
    assert akv(**opts.method_options).layers[0].protect_recent == 20
