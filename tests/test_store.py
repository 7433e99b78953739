"""The slot store: its invariants while decoding, the fixed-shape decode step, chunked prefill."""

from __future__ import annotations

import pytest
import torch

from arkv_bench.cache import make_cache
from arkv_bench.cache.store import Fusion, SlotLayer, lowest
from arkv_bench.generation import Decoder, chunk_bounds, extend, greedy_generate, left_pad, prefill
from tests.conftest import DEVICE, prompt_ids

C, W = 64, 16
SLOT_METHODS = {  # label -> (method, options)
    "mix": ("mix", {"cache_size": C}), "mix-slack": ("mix", {"cache_size": C, "slack": 4}),
    "origin": ("origin", {"cache_size": C}), "h2o": ("h2o", {"cache_size": C}),
    "window": ("window", {"cache_size": C}), "snapkv": ("snapkv", {"cache_size": C}),
    "snapkv-decode": ("snapkv", {"cache_size": C, "decode_compress": True}),
    "pyramidkv": ("pyramidkv", {"cache_size": C}), "adakv": ("adakv", {"cache_size": C}),
    "quant": ("quant", {}),
}


def build(label, model):
    method, options = SLOT_METHODS[label]
    return make_cache(method, model.config, window_size=W, **options)


def positions(layer) -> list[torch.Tensor]:
    """Live positions of every (row, head), Original and Quantized together."""
    pos = layer.all_positions()
    live = layer.live(pos)
    return [row[keep] for row, keep in zip(pos.reshape(-1, pos.shape[-1]), live.reshape(-1, pos.shape[-1]))]


def decode_steps(model, cache, ids, mask, steps):
    """Prefill, then the generation loop's own step function (fixed buffers), run eagerly."""
    cache.reserve(ids.shape[1], steps + 1)
    first = prefill(model, ids, mask, cache).argmax(-1)
    decoder = Decoder(model, cache, first, mask, torch.tensor([], dtype=torch.long, device=DEVICE), steps + 1,
                      graphs=False)
    yield decoder
    for _ in range(steps):
        decoder.step()
        cache.settle()  # what the cache does before anything reads the stores (mix's first event rebuilds here)
        yield decoder


@pytest.mark.parametrize("label", list(SLOT_METHODS))
def test_store_invariants_every_step(llama, label):
    """Budget held, no position twice, the window at full precision, no allocation after prefill,
    and attention never sees an empty or padding slot."""
    rows = [prompt_ids(n, seed=20 + i)[0].tolist() for i, n in enumerate([150, 110])]
    ids, mask = left_pad(rows, 0, DEVICE)
    cache = build(label, llama)
    shapes = None
    for step, _ in enumerate(decode_steps(llama, cache, ids, mask, 12)):
        for layer in cache.layers:
            budget = layer.cache_size if layer.decode_evicts else None
            for held in positions(layer):
                assert held.unique().numel() == held.numel(), "a position is held twice"
                if budget is not None and label != "adakv":
                    assert held.numel() <= budget
            recent = torch.arange(layer.seen - W, layer.seen, dtype=torch.int32, device=DEVICE)
            for b, start in enumerate(layer.start.tolist()):
                for row in layer.pos[b]:
                    assert torch.isin(recent[recent >= start], row).all(), "the window is held at full precision"
            query = torch.randn(ids.shape[0], 4, 1, 32, device=DEVICE)
            _, probs = layer.slot_attention(query, 1.0)
            dead = ~layer.live(layer.all_positions()).repeat_interleave(2, dim=1)
            assert (probs.squeeze(2)[dead] == 0).all(), "an empty or padding slot was attended"
        now = [tuple(t.shape) for layer in cache.layers for t in (layer.keys, layer.pos)]
        if step > SLOT_METHODS[label][1].get("slack", 0) + 1:  # after ARKV's first quantization sized its stores
            assert shapes is None or now == shapes, "a store was reallocated while decoding"
            shapes = now


@pytest.mark.parametrize("q", [8, 40])
@pytest.mark.parametrize("label", list(SLOT_METHODS))
def test_several_tokens_at_once_after_compression(llama, label, q, monkeypatch):
    """A text fed in chunks (ppl) or a question after its compressed context: new tokens only take empty
    slots, no position is held twice, the budget holds, and ARKV's Original store is back within
    window + origin_l after every forward."""
    write = SlotLayer.write

    def checked(layer, key_states, value_states):
        slots = lowest(layer.pos, key_states.shape[2])
        assert (layer.pos.gather(2, slots) == -1).all(), "a new token was written over a live slot"
        write(layer, key_states, value_states)

    monkeypatch.setattr(SlotLayer, "write", checked)
    cache = build(label, llama)
    ids = prompt_ids(150, seed=3)
    mask = torch.ones_like(ids)
    prefill(llama, ids, mask, cache)
    for step in range(4):
        _, mask = extend(llama, prompt_ids(q, seed=100 + step), mask, cache)
        for layer in cache.layers:
            for held in positions(layer):
                assert held.unique().numel() == held.numel(), "a position is held twice"
                if layer.decode_evicts and label != "adakv":
                    assert held.numel() <= layer.cache_size
            if getattr(layer, "quantizing", False):
                assert (layer.live(layer.pos).sum(-1) <= W + layer.origin_budget.view(-1, 1)).all()


@pytest.mark.parametrize("label", list(SLOT_METHODS) + ["full-static"])
def test_fixed_step_equals_the_growing_mask_path(llama, label):
    """The step the CUDA graphs replay (fixed buffers and mask), run eagerly, gives the tokens of the
    plain loop that feeds each token with the model's growing 2D mask."""
    ids = prompt_ids(150)
    mask = torch.ones_like(ids)
    new = 14
    fresh = (lambda: make_cache("full-static", llama.config)) if label == "full-static" else (lambda: build(label, llama))
    gen = greedy_generate(llama, ids, mask, fresh(), new, compile=False)
    cache = fresh()
    cache.reserve(ids.shape[1], new)
    token = prefill(llama, ids, mask, cache).argmax(-1, keepdim=True)
    tokens = [token.item()]
    for _ in range(new - 1):
        logits, mask = extend(llama, token, mask, cache)
        token = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token.item())
    assert gen.tokens[0] == tokens


def test_full_static_equals_full(llama):
    rows = [prompt_ids(n, seed=5 + i)[0].tolist() for i, n in enumerate([120, 80])]
    ids, mask = left_pad(rows, 0, DEVICE)
    full = greedy_generate(llama, ids, mask, make_cache("full", llama.config), 12)
    static = greedy_generate(llama, ids, mask, make_cache("full-static", llama.config), 12)
    assert static.tokens == full.tokens


@pytest.mark.parametrize("label", ["mix", "mix-slack", "h2o", "window", "snapkv-decode"])
def test_a_row_under_budget_evicts_nothing_while_its_batch_mate_evicts(llama, label):
    """Eviction takes, per row, only what the row holds over the budget: in a padded batch, a 30-token row
    keeps every token it sees while the 150-token row is held to the budget."""
    rows = [prompt_ids(n, seed=60 + i)[0].tolist() for i, n in enumerate([150, 30])]
    ids, mask = left_pad(rows, 0, DEVICE)
    cache = build(label, llama)
    for _ in decode_steps(llama, cache, ids, mask, 12):
        for layer in cache.layers:
            long_row, short_row = (positions(layer)[i * layer.pos.shape[1]] for i in range(2))
            assert long_row.numel() <= C and layer.triggered
            seen_short = torch.arange(150 - 30, layer.seen, dtype=torch.int32, device=DEVICE)
            assert torch.equal(short_row.sort().values, seen_short), "the short row lost a token"


@pytest.mark.parametrize("label", ["mix", "origin"])
def test_every_arkv_decode_step_may_replay(llama, label):
    """ARKV's Original budgets need every layer's OQ score: mix's plan of its first decoding forward assigns
    them on the host (before the forward, not inside it); that forward's quantization event only scores,
    and its rebuild waits for settle(), so every step has a plan (may replay from a graph). origin never
    uses the budgets while decoding; its stats still give the OQ ratios."""
    ids = prompt_ids(100)
    cache = build(label, llama)
    cache.reserve(ids.shape[1], 3)
    first = prefill(llama, ids, torch.ones_like(ids), cache).argmax(-1)
    decoder = Decoder(llama, cache, first, torch.ones_like(ids), torch.tensor([], dtype=torch.long, device=DEVICE),
                      3, graphs=False)
    assert cache.plan(1) is not None
    assert (cache.layers[0].origin_budget is not None) == (label == "mix")
    decoder.step()
    assert all((layer.first_score is not None) == (label == "mix") for layer in cache.layers)
    assert cache.plan(1) is not None  # settles first
    assert all(layer.first_score is None and layer.quantizing == (label == "mix") for layer in cache.layers)
    assert all(layer["oq_ratio"] is not None for layer in cache.stats()["layers"])


@pytest.mark.parametrize("label", ["mix", "origin", "h2o", "window", "quant", "snapkv"])
def test_steady_steps_have_one_plan_and_no_host_sync(llama, label, monkeypatch):
    """After the first events, every step has the same plan (one captured graph replays them all), and
    the step reads nothing back from the device."""
    ids = prompt_ids(150)
    cache = build(label, llama)
    plans = []
    for step, decoder in enumerate(decode_steps(llama, cache, ids, torch.ones_like(ids), 8)):
        plans.append(cache.plan(1))
        if step == 6:
            def forbidden(*_args, **_kwargs):
                raise AssertionError("host sync inside the decode step")
            with monkeypatch.context() as patch:
                for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
                    patch.setattr(torch.Tensor, name, forbidden)
                decoder.step()
            break
    assert None not in plans[2:] and len(set(plans[2:])) == 1


@pytest.mark.parametrize("label", ["mix", "h2o", "snapkv", "window", "quant", "adakv"])
def test_chunked_prefill_scores_equal_one_pass(llama, label):
    """Chunk by chunk, each method gets the scores of the one-pass prefill (ARKV's OQ and the kept tokens,
    H2O's accumulated attention) and then decodes the same tokens."""
    rows = [prompt_ids(n, seed=30 + i)[0].tolist() for i, n in enumerate([150, 100])]
    ids, mask = left_pad(rows, 0, DEVICE)
    one, chunked = build(label, llama), build(label, llama)
    prefill(llama, ids, mask, one)
    prefill(llama, ids, mask, chunked, prefill_chunk=40)
    for a, b in zip(one.layers, chunked.layers):
        assert [p.sort().values.tolist() for p in positions(a)] == [p.sort().values.tolist() for p in positions(b)]
        if label == "mix":
            assert torch.allclose(a.oq, b.oq, rtol=1e-5)
        if label == "h2o":
            order_a, order_b = a.pos.argsort(dim=-1), b.pos.argsort(dim=-1)
            assert torch.allclose(a.acc.gather(2, order_a), b.acc.gather(2, order_b), atol=1e-6)
    assert greedy_generate(llama, ids, mask, build(label, llama), 10).tokens == \
        greedy_generate(llama, ids, mask, build(label, llama), 10, prefill_chunk=40).tokens


def test_chunk_bounds_keep_the_last_chunk_whole():
    assert chunk_bounds(100, 0) == [(0, 100)]
    assert chunk_bounds(100, 40) == [(0, 20), (20, 60), (60, 100)]
    assert chunk_bounds(80, 40) == [(0, 40), (40, 80)]
    assert chunk_bounds(30, 40) == [(0, 30)]


@pytest.mark.parametrize("label", ["mix", "quant"])
def test_compiled_step_methods_trace_whole_and_equal_eager(llama, label, monkeypatch):
    """On CUDA the store's step methods run compiled (Fusion): each must trace as one graph (no host
    value read) and give the eager tokens. Checked here with a CPU backend that only traces."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend="aot_eager", **kw))
    monkeypatch.setattr(Fusion, "compiled", {})
    tokens = []
    for fuse in (False, True):
        ids = prompt_ids(150)
        cache = build(label, llama)
        out = []
        for step, decoder in enumerate(decode_steps(llama, cache, ids, torch.ones_like(ids), 8)):
            if step < 8:
                Fusion.on = fuse and cache.plan(1) is not None
                try:
                    out.append(decoder.step().item())
                finally:
                    Fusion.on = False
        tokens.append(out)
    assert not Fusion.broken and tokens[0] == tokens[1]
