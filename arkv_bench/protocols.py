"""The query-agnostic protocol: compress the context alone, then ask the question through that cache.

Query-aware (the default, the ARKV paper's protocol) prefills the whole prompt, question included,
so a method that scores tokens with the last window's queries (SnapKV, ARKV) is told what to keep.
Query-agnostic prefills and compresses the context alone (`compress_context`); the question and the
answer prefix then go through the compressed cache as new tokens, and greedy decoding follows
(`generate_after_context`). Samples whose contexts are the same tokens share one compressed context:
it is compressed once and each question gets its own `copy.deepcopy` of it (arkv_bench.suites.base).

Both functions use only `generation.prefill` / `generation.extend` and a plain greedy loop, batch
size 1, so a faster decode loop can replace their insides without touching the suites.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel

from arkv_bench.cache import BenchCache
from arkv_bench.generation import Generation, clock, extend, prefill
from arkv_bench.options import UsageError

QUERY_AWARE, QUERY_AGNOSTIC = "query-aware", "query-agnostic"


def compress_context(model: PreTrainedModel, context_ids: Sequence[int], cache: BenchCache, reserve: int = 0
                     ) -> tuple[torch.Tensor, float]:
    """Prefill (and so compress) the context alone; returns (its attention mask, seconds). `reserve`: the
    tokens that will follow (question and answer), so that the cache's slots are sized once."""
    device = model.device
    ids = torch.tensor([list(context_ids)], dtype=torch.long, device=device)
    mask = torch.ones_like(ids)
    cache.reserve(ids.shape[1], reserve)
    t0 = clock(device)
    prefill(model, ids, mask, cache)
    return mask, clock(device) - t0


def generate_after_context(model: PreTrainedModel, question_ids: Sequence[int], mask: torch.Tensor,
                           cache: BenchCache, max_new_tokens: int, eos_ids: Sequence[int] = (),
                           should_stop: Callable[[list[int]], bool] | None = None) -> Generation:
    """Feed the question through a cache that holds the (compressed) context, then decode greedily.

    `prefill_s` and `ttft_s` count from the question's first token: the context's cost is
    `compress_context`'s, reported apart because several questions may share it.
    """
    device = model.device
    eos = set(eos_ids)
    t0 = clock(device)
    logits, mask = extend(model, torch.tensor([list(question_ids)], dtype=torch.long, device=device), mask, cache)
    prefill_s = clock(device) - t0
    token = int(logits[0, -1].argmax())
    ttft = clock(device) - t0
    row, itl = [token], []
    while len(row) < max_new_tokens and token not in eos and not (should_stop and should_stop(row)):
        t1 = clock(device)
        logits, mask = extend(model, torch.tensor([[token]], device=device), mask, cache)
        token = int(logits[0, -1].argmax())
        itl.append(clock(device) - t1)
        row.append(token)
    answer = row[:row.index(next(t for t in row if t in eos))] if any(t in eos for t in row) else row
    return Generation(tokens=[answer], prefill_s=prefill_s, ttft_s=ttft, itl_s=itl, generated=[len(row)],
                      kv_bytes=cache.kv_bytes(), kv_bytes_full=cache.full_kv_bytes(), host_bytes=cache.host_bytes(),
                      stats=cache.stats())


def question_token(tokenizer: Any, chat: bool, text: str, question: str) -> int:
    """Where the question's tokens begin among the tokens of `text` (the prompt and its tail, the chat
    template applied when `chat`): the first token that reaches into the question. The context is then
    exactly the first k tokens, so both protocols see the same tokens. UsageError when the prompt does
    not hold its question or nothing comes before it."""
    from arkv_bench.suites.passkey import _Measurer

    at = text.rfind(question) if question else -1
    if at < 0:
        raise UsageError("query-agnostic needs to know where each prompt's question begins, and this suite's "
                         "prompts do not say: use --protocol query-aware")
    k = _Measurer(tokenizer, chat).needle_index(text, at)
    if k < 1:
        raise UsageError("query-agnostic needs a context before the question, and a prompt has none (e.g. "
                         "--num-fewshot 0 leaves GSM8K none): use --protocol query-aware")
    return k
