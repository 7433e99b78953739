"""One prefill per prompt for a sweep of methods and budgets.

The slot-store methods (and `full`) keep the prompt dense through every prefill forward and select
what they keep after the last one: ARKV, SnapKV, PyramidKV and AdaKV score with that forward's
last `window_size` queries, H2O with the attention it accumulated over every forward, window and
quant with positions alone. The forward passes themselves are the same for all of them. So a sweep
runs the prompt once through a recording cache, in the chunks a separate run would use, and keeps
each layer's dense keys and values, the last forward's last `tail` queries and the logits of the
last position; each configuration adopts that state and only selects, exactly as its own separate
run selects after its last forward:

    record = record_prompt(model, input_ids, attention_mask, tail=32, accumulate=needs_accumulated(methods))
    for method, budget in sweep:
        cache = make_cache(method, model.config, cache_size=budget, window_size=32)
        gen = generate_from(model, record, cache, max_new_tokens=64, eos_ids=eos)

A configuration's prefill time (and TTFT) is the shared forward plus its own selection:
`gen.prefill_s` includes both, `gen.shared_prefill_s` is the shared one. H2O's accumulation
(recorded only when H2O is in the sweep) is timed apart and counted in H2O's shared part only.
The record is read, never written. Runs from a record equal separate runs bit for bit when the
record used the same `prefill_chunk` and `tail` >= the method's window.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import CacheLayerMixin

from arkv_bench.cache import METHODS, BenchCache, prepare_model
from arkv_bench.cache.base import FullLayer
from arkv_bench.cache.h2o import H2OLayer
from arkv_bench.cache.store import SlotLayer
from arkv_bench.generation import Generation, clock, default_prefill_chunk, greedy_generate, prefill


@dataclass(frozen=True)
class LayerPrompt:
    """One layer after the prompt: keys, values [B, Hkv, n, D], positions [B, Hkv, n] (int32), H2O's
    accumulated attention [B, Hkv, n] (float32, when recorded), and the last forward's last `tail`
    queries [B, Hq, t, D] with the attention's scaling, which the scoring methods select with."""

    keys: torch.Tensor
    values: torch.Tensor
    pos: torch.Tensor
    acc: torch.Tensor | None
    query: torch.Tensor
    scaling: float


@dataclass(frozen=True)
class PromptRecord:
    """The prompt, each layer's state after it, the last position's logits [B, V], the queries kept
    per layer (`tail`), the seconds the forward took and, of them, the seconds spent accumulating
    H2O's attention."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    layers: list[LayerPrompt]
    logits: torch.Tensor
    tail: int
    forward_s: float
    accumulate_s: float = 0.0

    def shared_s(self, cache: BenchCache) -> float:
        """The part of the forward that `cache`'s method would have run: all of it for H2O, the forward
        without the accumulation for the others."""
        return self.forward_s - (0.0 if isinstance(cache.layers[0], H2OLayer) else self.accumulate_s)


class _Recording:
    """Mixin for a slot layer: after the last forward, keep the queries the methods select with instead of
    selecting (each configuration selects for itself). The record's `window_size` is its tail."""

    query: torch.Tensor | None = None
    scaling = 1.0

    def end_prefill(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        self.query, self.scaling = query[:, :, -self.window_size:].clone(), scaling  # not a view: the rest is freed


class _RecordLayer(_Recording, SlotLayer):
    """The slot layer's dense prefill, nothing else."""


class _RecordH2OLayer(_Recording, H2OLayer):
    """Also sums the attention every token receives, as H2O's own prefill does, and times that work:
    it is H2O's own cost, not the shared forward's."""

    accumulate_s = 0.0

    def accumulate(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        t0 = clock(query.device)
        super().accumulate(query, key, scaling)
        self.accumulate_s += clock(query.device) - t0


class _RecordCache(BenchCache):
    method = "prompt-record"
    budgeted = False
    defaults = {"cache_size": None, "window_size": 1}

    def __init__(self, num_layers: int, tail: int, accumulate: bool):
        self.layer_class = _RecordH2OLayer if accumulate else _RecordLayer
        super().__init__(num_layers, window_size=tail)  # prefill's chunks: at least `tail` tokens, as a method's


def shares_prefill(method: str) -> bool:
    """Whether `method` can start from a recorded prompt: its layers stay dense until the last prefill
    forward (the slot store) or are the model's own dynamic layer (`full`). Others run separately."""
    layer = METHODS[method].layer_class
    return issubclass(layer, (SlotLayer, FullLayer))


def needs_accumulated(methods: Iterable[str]) -> bool:
    """Whether some method of the sweep scores with the attention accumulated over the prompt (H2O)."""
    return any(issubclass(METHODS[m].layer_class, H2OLayer) for m in methods)


@torch.inference_mode()
def record_prompt(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, tail: int,
                  prefill_chunk: int | None = None, accumulate: bool = False) -> PromptRecord:
    """Run the prompt through the model once, `prefill_chunk` tokens at a time (0: one pass; default:
    greedy_generate's; chunks of at least `tail`), and keep each layer's dense state and the last forward's
    last `tail` queries. `tail` must be at least the largest `window_size` of the sweep. `accumulate`: keep
    H2O's attention sums too."""
    if tail < 1:
        raise ValueError(f"tail must be a positive token count, got {tail}")
    prepare_model(model)
    device = input_ids.device
    prefill_chunk = default_prefill_chunk(device) if prefill_chunk is None else prefill_chunk
    t0 = clock(device)
    cache = _RecordCache(model.config.get_text_config().num_hidden_layers, tail, accumulate)
    logits = prefill(model, input_ids, attention_mask, cache, prefill_chunk)
    forward_s = clock(device) - t0
    layers = [LayerPrompt(layer.keys, layer.values, layer.pos, layer.acc if accumulate else None, layer.query,
                          layer.scaling) for layer in cache.layers]
    accumulate_s = sum(getattr(layer, "accumulate_s", 0.0) for layer in cache.layers)
    return PromptRecord(input_ids, attention_mask, layers, logits, tail, forward_s, accumulate_s)


def _adopt(layer: CacheLayerMixin, prompt: LayerPrompt) -> None:
    """Give a fresh layer the recorded dense state (by reference: selecting and decoding make new tensors,
    so the record is never written)."""
    if layer.is_initialized:
        raise ValueError("the cache already holds tokens: give prefill_from a fresh cache")
    layer.keys, layer.values = prompt.keys, prompt.values
    layer.is_initialized = True
    if isinstance(layer, SlotLayer):
        layer.take_device(prompt.keys.dtype, prompt.keys.device)
        layer.pos, layer.seen = prompt.pos, prompt.keys.shape[2]
    else:
        layer.dtype, layer.device = prompt.keys.dtype, prompt.keys.device
    if isinstance(layer, H2OLayer):
        layer.acc = prompt.acc


def _check(record: PromptRecord, cache: BenchCache) -> None:
    if not shares_prefill(cache.method):
        raise ValueError(f"method {cache.method!r} cannot start from a shared prompt: run it with greedy_generate")
    if len(record.layers) != len(cache.layers):
        raise ValueError(f"the record has {len(record.layers)} layers, the cache {len(cache.layers)}: "
                         "record the prompt with the same model")
    window = cache.options.get("window_size") or 0
    if isinstance(cache.layers[0], SlotLayer) and record.tail < window:
        raise ValueError(f"{cache.method}: the record kept {record.tail} queries per layer, fewer than window_size "
                         f"({window}): record the prompt with tail >= {window}")
    if isinstance(cache.layers[0], H2OLayer) and record.layers[0].acc is None:
        raise ValueError(f"{cache.method} scores with the accumulated attention: "
                         "record the prompt with accumulate=True")


@torch.inference_mode()
def prefill_from(model: PreTrainedModel, record: PromptRecord, cache: BenchCache) -> torch.Tensor:
    """Adopt the recorded prompt into a fresh `cache`, let each layer select what it keeps (as after its own
    last prefill forward) and return the last position's logits [B, V]."""
    _check(record, cache)
    cache.set_prompt_mask(record.attention_mask)
    cache.set_prefill_open(False)
    for layer, prompt in zip(cache.layers, record.layers):
        _adopt(layer, prompt)
        if isinstance(layer, SlotLayer):
            layer.end_prefill(prompt.query, prompt.keys, prompt.scaling)
    return record.logits


def generate_from(model: PreTrainedModel, record: PromptRecord, cache: BenchCache, max_new_tokens: int,
                  eos_ids: Sequence[int] = (), should_stop: Callable[[list[int]], bool] | None = None,
                  compile: bool | None = None) -> Generation:
    """greedy_generate's decoding after `prefill_from`. prefill_s and ttft_s include the shared forward
    (`record.shared_s(cache)`, also in shared_prefill_s), so they read as a separate run's."""
    gen = greedy_generate(model, record.input_ids, record.attention_mask, cache, max_new_tokens, eos_ids, should_stop,
                          compile, run_prompt=lambda: prefill_from(model, record, cache))
    shared = record.shared_s(cache)
    return replace(gen, prefill_s=gen.prefill_s + shared, ttft_s=gen.ttft_s + shared, shared_prefill_s=shared)
