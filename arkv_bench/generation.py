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


@torch.inference_mode()
def prefill(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: BenchCache
            ) -> torch.Tensor:
    """Run the prompt through the cache; return the last position's logits [B, V]."""
    positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1, :]


@torch.inference_mode()
def extend(model: PreTrainedModel, tokens: torch.Tensor, attention_mask: torch.Tensor, cache: BenchCache
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed `tokens` [B, q] after what the cache has seen; return (logits [B, q, V], the grown mask)."""
    start = attention_mask.sum(-1, keepdim=True)
    positions = start + torch.arange(tokens.shape[1], device=tokens.device)
    attention_mask = torch.cat([attention_mask, torch.ones_like(tokens)], dim=-1)
    out = model(input_ids=tokens, attention_mask=attention_mask, position_ids=positions,
                past_key_values=cache, use_cache=True)
    return out.logits, attention_mask


def greedy_generate(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    cache: BenchCache, max_new_tokens: int, eos_ids: Sequence[int] = (),
                    should_stop: Callable[[list[int]], bool] | None = None) -> Generation:
    """Greedy decoding until every row hit EOS, a stop, or `max_new_tokens`."""
    device = input_ids.device
    eos = set(eos_ids)
    _sync(device)
    t0 = time.perf_counter()
    logits = prefill(model, input_ids, attention_mask, cache)
    _sync(device)
    prefill_s = time.perf_counter() - t0
    next_tokens = logits.argmax(-1)
    _sync(device)
    ttft = time.perf_counter() - t0
    rows: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    done = [False] * len(rows)
    _record(rows, done, next_tokens, eos, should_stop)  # host-side stop handling: not timed
    itl: list[float] = []
    for _ in range(max_new_tokens - 1):
        if all(done):
            break
        t1 = time.perf_counter()
        logits, attention_mask = extend(model, next_tokens[:, None], attention_mask, cache)
        next_tokens = logits[:, -1, :].argmax(-1)
        _sync(device)
        itl.append(time.perf_counter() - t1)
        _record(rows, done, next_tokens, eos, should_stop)
    return Generation(tokens=[_cut(r, eos) for r in rows], prefill_s=prefill_s, ttft_s=ttft, itl_s=itl,
                      generated=[len(r) for r in rows],
                      kv_bytes=cache.kv_bytes(), kv_bytes_full=cache.full_kv_bytes(), host_bytes=cache.host_bytes(),
                      stats=cache.stats())


def _record(rows: list[list[int]], done: list[bool], tokens: torch.Tensor, eos: set[int],
            should_stop: Callable[[list[int]], bool] | None) -> None:
    for i, token in enumerate(tokens.tolist()):
        if done[i]:
            continue
        rows[i].append(token)
        done[i] = token in eos or (should_stop is not None and should_stop(rows[i]))


def _cut(row: list[int], eos: set[int]) -> list[int]:
    """The row up to (not including) its first EOS."""
    for i, token in enumerate(row):
        if token in eos:
            return row[:i]
    return row
