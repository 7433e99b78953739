"""One prefill per prompt for a sweep of methods and budgets.

The slot-store methods (and `full`) keep the prompt dense until the last prefill forward and
select what they keep after it: ARKV, SnapKV, PyramidKV and AdaKV score with that forward's
last `window_size` queries, H2O with the attention it accumulated over every forward, window and
quant with positions alone. Everything before the last forward is the same for all of them. So a
sweep runs the prompt's prefix (all but the last `tail` tokens of each row) once through a
recording cache, and each configuration adopts the recorded prefix and runs only the tail through
its own cache, which then compresses exactly as in a separate run:

    record = record_prefix(model, input_ids, attention_mask, tail=32, accumulate=needs_accumulated(methods))
    for method, budget in sweep:
        cache = make_cache(method, model.config, cache_size=budget, window_size=32)
        gen = generate_from(model, record, cache, max_new_tokens=64, eos_ids=eos)

A configuration's prefill time (and TTFT) is the shared forward plus its own part, the tail's
forward and the compression: `gen.prefill_s` includes both, `gen.shared_prefill_s` is the
shared one. H2O's accumulation over the prefix (recorded only when H2O is in the sweep) is timed
apart and counted in H2O's shared part only. The record is read, never written: every cache concatenates onto it.

Exactness: the prefix runs in the chunks `generation.prefill` would use with
`prefill_chunk=tail` (chunk_bounds), so `prefill_chunk=tail` in both gives bit-identical runs;
with `prefill_chunk=0` the prefix is one pass and the tail a second one (the same attention, up
to float rounding, as a one-pass prefill).
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
class LayerPrefix:
    """One layer's dense prefix: keys, values [B, Hkv, n, D], positions [B, Hkv, n] (int32),
    and H2O's accumulated attention [B, Hkv, n] (float32) when it was recorded."""

    keys: torch.Tensor
    values: torch.Tensor
    pos: torch.Tensor
    acc: torch.Tensor | None


@dataclass(frozen=True)
class PrefixRecord:
    """The prompt, where its tail starts (`split`, in the padded width), each layer's prefix, the
    seconds the prefix's forward took and, of them, the seconds spent accumulating H2O's attention."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    split: int
    layers: list[LayerPrefix]
    forward_s: float
    accumulate_s: float = 0.0

    def shared_s(self, cache: BenchCache) -> float:
        """The part of the prefix's forward that `cache`'s method would have run: all of it for H2O,
        the forward without the accumulation for the others."""
        return self.forward_s - (0.0 if isinstance(cache.layers[0], H2OLayer) else self.accumulate_s)

    @property
    def tail(self) -> int:
        return self.input_ids.shape[1] - self.split


class _Recording:
    """Mixin for a slot layer: stays dense after the prefix's last forward (selecting is each
    configuration's job, after its tail)."""

    def end_prefill(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        pass


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
    method = "prefix-record"
    budgeted = False
    defaults = {"cache_size": None, "window_size": 1}

    def __init__(self, num_layers: int, accumulate: bool):
        self.layer_class = _RecordH2OLayer if accumulate else _RecordLayer
        super().__init__(num_layers)


def shares_prefill(method: str) -> bool:
    """Whether `method` can start from a recorded prefix: its layers stay dense until the last prefill
    forward (the slot store) or are the model's own dynamic layer (`full`). Others run separately."""
    layer = METHODS[method].layer_class
    return issubclass(layer, (SlotLayer, FullLayer))


def needs_accumulated(methods: Iterable[str]) -> bool:
    """Whether some method of the sweep scores with the attention accumulated over the prefix (H2O)."""
    return any(issubclass(METHODS[m].layer_class, H2OLayer) for m in methods)


@torch.inference_mode()
def record_prefix(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, tail: int,
                  prefill_chunk: int | None = None, accumulate: bool = False) -> PrefixRecord:
    """Run all but the last `tail` tokens (per row, of the padded width) through the model once,
    `prefill_chunk` tokens at a time (0: one pass; default: greedy_generate's), and keep each layer's
    dense state. `tail` must be at least the largest `window_size` of the sweep; a prompt no longer than
    `tail` records nothing (each configuration then runs the whole prompt). `accumulate`: keep H2O's
    attention sums too."""
    if tail < 1:
        raise ValueError(f"tail must be a positive token count, got {tail}")
    prepare_model(model)
    device = input_ids.device
    split = max(input_ids.shape[1] - tail, 0)
    prefill_chunk = default_prefill_chunk(device) if prefill_chunk is None else prefill_chunk
    t0 = clock(device)
    cache = _RecordCache(model.config.get_text_config().num_hidden_layers, accumulate)
    if split:
        prefill(model, input_ids[:, :split], attention_mask[:, :split], cache, prefill_chunk)
    forward_s = clock(device) - t0
    layers = [LayerPrefix(layer.keys, layer.values, layer.pos, layer.acc if accumulate else None)
              for layer in cache.layers] if split else []
    accumulate_s = sum(getattr(layer, "accumulate_s", 0.0) for layer in cache.layers)
    return PrefixRecord(input_ids, attention_mask, split, layers, forward_s, accumulate_s)


def _adopt(layer: CacheLayerMixin, prefix: LayerPrefix) -> None:
    """Give a fresh dense layer the recorded prefix (by reference: the layer's next update
    concatenates, so the record is never written)."""
    if layer.is_initialized:
        raise ValueError("the cache already holds tokens: give prefill_from a fresh cache")
    layer.dtype, layer.device = prefix.keys.dtype, prefix.keys.device
    layer.keys, layer.values = prefix.keys, prefix.values
    layer.is_initialized = True
    if isinstance(layer, SlotLayer):
        layer.pos, layer.seen = prefix.pos, prefix.keys.shape[2]
    if isinstance(layer, H2OLayer):
        layer.acc = prefix.acc


def _check(record: PrefixRecord, cache: BenchCache) -> None:
    if not shares_prefill(cache.method):
        raise ValueError(f"method {cache.method!r} cannot start from a shared prefix: run it with greedy_generate")
    if len(record.layers) not in (0, len(cache.layers)):
        raise ValueError(f"the record has {len(record.layers)} layers, the cache {len(cache.layers)}: "
                         "record the prefix with the same model")
    window = cache.options.get("window_size") or 0
    if isinstance(cache.layers[0], SlotLayer) and record.tail < window:
        raise ValueError(f"{cache.method}: the recorded tail ({record.tail} tokens) is shorter than window_size "
                         f"({window}): record the prefix with tail >= {window}")
    if record.layers and isinstance(cache.layers[0], H2OLayer) and record.layers[0].acc is None:
        raise ValueError(f"{cache.method} scores with the accumulated attention: "
                         "record the prefix with accumulate=True")


@torch.inference_mode()
def prefill_from(model: PreTrainedModel, record: PrefixRecord, cache: BenchCache) -> torch.Tensor:
    """Adopt the recorded prefix into a fresh `cache`, run the tail through it (the method selects what
    it keeps after this forward, as after a separate prefill) and return the last position's logits [B, V]."""
    _check(record, cache)
    ids, mask = record.input_ids, record.attention_mask
    for layer, prefix in zip(cache.layers, record.layers):
        _adopt(layer, prefix)
    cache.set_prompt_mask(mask)
    cache.set_prefill_open(False)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # as generation.prefill gives them
    out = model(input_ids=ids[:, record.split:], attention_mask=mask, position_ids=positions[:, record.split:],
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1, :]


def generate_from(model: PreTrainedModel, record: PrefixRecord, cache: BenchCache, max_new_tokens: int,
                  eos_ids: Sequence[int] = (), should_stop: Callable[[list[int]], bool] | None = None,
                  compile: bool | None = None) -> Generation:
    """greedy_generate's decoding after `prefill_from`. prefill_s and ttft_s include the shared forward
    (`record.shared_s(cache)`, also in shared_prefill_s), so they read as a separate run's."""
    gen = greedy_generate(model, record.input_ids, record.attention_mask, cache, max_new_tokens, eos_ids, should_stop,
                          compile, run_prompt=lambda: prefill_from(model, record, cache))
    shared = record.shared_s(cache)
    return replace(gen, prefill_s=gen.prefill_s + shared, ttft_s=gen.ttft_s + shared, shared_prefill_s=shared)
