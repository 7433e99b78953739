"""The tool's own prefill + greedy decode loop, with timings.

Rows of a batch are left-padded; positions come from the attention mask, so every row's
tokens get the positions they would have alone. Timings synchronise CUDA, so they measure
the work and not the launch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from arkv_bench.cache import BenchCache
from arkv_bench.cache.store import Fusion
from arkv_bench.layer_major import applies, layer_major_prefill


@dataclass
class Generation:
    """What one batch produced and what it cost."""

    tokens: list[list[int]]  # generated ids per row, cut after EOS or a stop
    prefill_s: float  # the prompt's forward pass
    ttft_s: float  # prompt in -> first token out
    itl_s: list[float] = field(default_factory=list)  # each decode step of the batch (arkv_bench.measures)
    generated: list[int] = field(default_factory=list)  # tokens each row generated, its EOS or stop included
    kv_bytes: int = 0  # what the cache holds at the end
    kv_bytes_full: int = 0  # what the full cache would hold for the same tokens
    host_bytes: int = 0  # what the cache keeps in CPU memory (AKV's cold tier), not in kv_bytes
    stats: dict[str, Any] = field(default_factory=dict)
    shared_prefill_s: float = 0.0  # of prefill_s and ttft_s: a forward pass shared with other runs (shared_prefill.py)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> float:
    """Seconds, after the device has finished the work queued so far."""
    _sync(device)
    return time.perf_counter()


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows -> (input_ids, attention_mask), left-padded to the longest row."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


DEFAULT_PREFILL_CHUNK = 4096  # CUDA default: bounds the activations of long prompts, batched (tokens per row)
EOS_CHECK_EVERY = 8  # CUDA: decode steps between two looks at the device's EOS flags (one sync each)


def default_prefill_chunk(device: torch.device) -> int:
    return DEFAULT_PREFILL_CHUNK if device.type == "cuda" else 0


def chunk_bounds(width: int, chunk: int) -> list[tuple[int, int]]:
    """[start, end) of each prefill chunk; the first takes the remainder so that the last is whole
    (the methods score with the last chunk's queries)."""
    if chunk <= 0 or chunk >= width:
        return [(0, width)]
    first = width % chunk
    edges = ([0] if first else []) + list(range(first, width + 1, chunk))
    return list(zip(edges[:-1], edges[1:]))


@torch.inference_mode()
def prefill(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: BenchCache,
            prefill_chunk: int = 0, layer_major: bool | None = None) -> torch.Tensor:
    """Run the prompt through the cache, `prefill_chunk` tokens per row at a time (0: in one pass);
    return the last position's logits [B, V]. The methods select what they keep after the last chunk.
    `layer_major` (default: where it applies, see layer_major.py) runs every chunk through a layer before
    the next layer, so a budgeted cache never holds more than one layer's dense prompt; same results."""
    positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    chunk = max(prefill_chunk, cache.options.get("window_size") or 0) if prefill_chunk > 0 else 0
    bounds = chunk_bounds(input_ids.shape[1], chunk)
    cache.set_prompt_mask(attention_mask)
    if layer_major is None:
        layer_major = applies(model, cache)
    if layer_major:
        logits = layer_major_prefill(model, input_ids, attention_mask, positions, cache, bounds)
        cache.set_prefill_open(False)
        return logits
    for i, (a, b) in enumerate(bounds):
        cache.set_prefill_open(i < len(bounds) - 1)
        out = model(input_ids=input_ids[:, a:b], attention_mask=attention_mask[:, :b], position_ids=positions[:, a:b],
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
    cache.set_prefill_open(False)
    return out.logits[:, -1, :]


@torch.inference_mode()
def extend(model: PreTrainedModel, tokens: torch.Tensor, attention_mask: torch.Tensor, cache: BenchCache
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed `tokens` [B, q] after what the cache has seen; return (logits [B, q, V], the grown mask)."""
    start = attention_mask.sum(-1, keepdim=True)
    positions = start + torch.arange(tokens.shape[1], device=tokens.device)
    attention_mask = torch.cat([attention_mask, torch.ones_like(tokens, device=attention_mask.device)], dim=-1)
    out = model(input_ids=tokens, attention_mask=attention_mask, position_ids=positions,
                past_key_values=cache, use_cache=True)
    return out.logits, attention_mask


WARMED: set[tuple] = set()  # (model, method, options, step plan, shapes) already run once in this process


class Decoder:
    """Greedy decode steps of one batch, on fixed buffers: the token fed, its position, the mask,
    the rows that hit EOS. With `graphs` (CUDA), each step plan the cache reports (cache.plan) is run
    eagerly the first time the process meets it (which compiles and warms it up), then captured in a
    CUDA graph and replayed; a step the cache cannot plan (a store grows, a method's one-off event)
    runs eagerly."""

    def __init__(self, model: PreTrainedModel, cache: BenchCache, first: torch.Tensor, attention_mask: torch.Tensor,
                 eos: torch.Tensor, new_tokens: int, graphs: bool):
        self.model, self.cache, self.eos = model, cache, eos
        self.token = first[:, None].clone()
        self.position = attention_mask.sum(-1, keepdim=True)
        self.done = torch.isin(first, eos)
        self.fixed_mask = cache.step_mask(attention_mask, new_tokens)
        self.mask = attention_mask  # grows each step when the cache has no fixed mask
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] | None = \
            {} if graphs and self.fixed_mask is not None else None
        self.pool = torch.cuda.graph_pool_handle() if self.graphs is not None else None

    def forward(self) -> torch.Tensor:
        """One step on the buffers: feed the token, then hold the next one (and the EOS flags) in them."""
        if self.fixed_mask is None:
            self.mask = torch.cat([self.mask, torch.ones_like(self.token, device=self.mask.device)], dim=-1)
        mask = self.mask if self.fixed_mask is None else self.fixed_mask
        logits = self.model(input_ids=self.token, attention_mask=mask, position_ids=self.position,
                            past_key_values=self.cache, use_cache=True).logits
        nxt = logits[:, -1].argmax(-1).to(self.token.device)
        self.token.copy_(nxt[:, None])
        self.position.add_(1)
        self.done |= torch.isin(nxt, self.eos)
        return nxt

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        """The next token of every row [B] (a buffer of the graph: copy it before the next step)."""
        key = self.cache.plan(1) if self.graphs is not None else None
        if key is None:
            return self.forward()
        if key in self.graphs:
            graph, out = self.graphs[key]
            graph.replay()
            self.cache.advance(1)
            return out
        Fusion.on = True  # the step's store methods run compiled (inductor) from here on
        try:
            signature = (id(self.model), type(self.cache), repr(sorted(self.cache.options.items())), key[1:],
                         self.cache.shapes())
            if signature not in WARMED:  # first time in this process: eagerly (compiles, initialises)
                WARMED.add(signature)
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    out = self.forward()
                torch.cuda.current_stream().wait_stream(side)
                return out
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):  # the host side of the step runs here, once
                out = self.forward()
        finally:
            Fusion.on = False
        self.graphs[key] = (graph, out)
        graph.replay()  # the device side
        return out


def greedy_generate(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    cache: BenchCache, max_new_tokens: int, eos_ids: Sequence[int] = (),
                    should_stop: Callable[[list[int]], bool] | None = None, compile: bool | None = None,
                    prefill_chunk: int | None = None, run_prompt: Callable[[], torch.Tensor] | None = None
                    ) -> Generation:
    """Greedy decoding until every row hit EOS, a stop, or `max_new_tokens`.

    `compile` (default: on for CUDA) replays decode steps from CUDA graphs where the cache allows it;
    `prefill_chunk` (default: 4096 on CUDA, 0 = one pass on CPU) splits the prompt. EOS is checked on
    the device; the host looks at it every few steps (every step on CPU or with `should_stop`).
    `run_prompt` replaces `prefill` (it returns the last position's logits): shared_prefill runs only
    the prompt's tail there."""
    device = input_ids.device
    compile = device.type == "cuda" if compile is None else compile
    prefill_chunk = default_prefill_chunk(device) if prefill_chunk is None else prefill_chunk
    cache.reserve(input_ids.shape[1], max_new_tokens)
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
    t0 = clock(device)
    logits = prefill(model, input_ids, attention_mask, cache, prefill_chunk) if run_prompt is None else run_prompt()
    prefill_s = clock(device) - t0
    first = logits.argmax(-1).to(device)  # a sharded model's logits come from its last GPU
    sharded = len(set(getattr(model, "hf_device_map", {}).values())) > 1  # --device-map: a graph per device is not kept
    decoder = Decoder(model, cache, first, attention_mask, eos, max_new_tokens,
                      compile and device.type == "cuda" and not sharded)
    steps = [first]
    check = 1 if device.type != "cuda" or should_stop is not None else EOS_CHECK_EVERY
    rows: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    done = [False] * len(rows)
    ttft = clock(device) - t0
    if should_stop is not None:  # host-side stop handling: not timed
        _record(rows, done, first, set(eos_ids), should_stop)
    spans = []  # (start, end) of each decode step: host-side stop handling falls between them, untimed
    for i in range(max_new_tokens - 1):
        if i % check == 0 and (all(done) if should_stop is not None else bool(decoder.done.all())):
            break
        start = _mark(device)
        steps.append(decoder.step().clone())
        spans.append((start, _mark(device)))
        if should_stop is not None:
            _record(rows, done, steps[-1], set(eos_ids), should_stop)
    itl = _durations(spans, device)
    tokens = rows if should_stop is not None else torch.stack(steps, dim=1).tolist()
    return Generation(tokens=[_cut(r, set(eos_ids)) for r in tokens], prefill_s=prefill_s, ttft_s=ttft, itl_s=itl,
                      generated=[_generated(r, set(eos_ids)) for r in tokens],
                      kv_bytes=cache.kv_bytes(), kv_bytes_full=cache.full_kv_bytes(), host_bytes=cache.host_bytes(),
                      stats=cache.stats())


def _mark(device: torch.device) -> Any:
    """A point in time: a CUDA event (no sync) or the host clock."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def _durations(spans: list[tuple[Any, Any]], device: torch.device) -> list[float]:
    """Seconds of each (start, end) span."""
    if device.type == "cuda":
        _sync(device)
        return [a.elapsed_time(b) / 1000 for a, b in spans]
    return [b - a for a, b in spans]


def _record(rows: list[list[int]], done: list[bool], tokens: torch.Tensor, eos: set[int],
            should_stop: Callable[[list[int]], bool] | None) -> None:
    for i, token in enumerate(tokens.tolist()):
        if done[i]:
            continue
        rows[i].append(token)
        done[i] = token in eos or (should_stop is not None and should_stop(rows[i]))


def _generated(row: list[int], eos: set[int]) -> int:
    """Tokens the row generated: up to and including its first EOS (later ones are the batch's padding)."""
    return len(_cut(row, eos)) + (len(_cut(row, eos)) < len(row))


def _cut(row: list[int], eos: set[int]) -> list[int]:
    """The row up to (not including) its first EOS."""
    for i, token in enumerate(row):
        if token in eos:
            return row[:i]
    return row
