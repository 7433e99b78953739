"""Generate with a compressed KV cache from Python, token by token or all at once.

    from arkv_bench import generate, stream
    for item in stream(model, tokenizer, "Once upon a time", method="mix", cache_size=256):
        print(item.text, end="", flush=True)           # item.state: tokens per layer in each state
    result = generate(model, tokenizer, messages, method="akv", hot_budget=128, warm_budget=128)

Both run the same greedy loop over `generation.prefill` / `generation.extend`, so `generate()`
returns exactly the tokens `stream()` yields; with `method="full"` they are the tokens of
transformers' own greedy `model.generate`. Timings cover the model's work only: what a
caller does between two streamed items is not counted.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from arkv_bench.cache import BenchCache, make_cache, prepare_model
from arkv_bench.cache.akv import AKVLayer
from arkv_bench.generation import extend, prefill

Prompt = str | Sequence[dict[str, Any]]
TIERS = ("hot", "warm", "cold", "evicted")
STATES = ("original", "quantized", "evicted")


@dataclass
class StreamItem:
    """One generated token, the text it completes, and the cache's state right after it."""

    token_id: int
    text: str  # new text; "" while a multi-token character is incomplete (it comes whole with a later token)
    latency_s: float  # this token's forward pass (for the first token: the prompt's, i.e. the TTFT)
    state: dict[str, float]  # tokens per layer (mean over layers): seen, and original / quantized / evicted,
    #                          or hot / warm / cold / evicted for `akv`


@dataclass
class Result:
    """What one `generate()` produced and what it cost."""

    text: str
    token_ids: list[int]  # generated ids, without the EOS that ended them
    prompt_tokens: int
    finish_reason: str  # "eos" or "length"
    ttft_s: float | None  # prompt in -> first token out (None if the first token was EOS)
    decode_tok_s: float | None  # tokens after the first, per second of their forward passes (None if fewer than 2)
    kv_bytes: int  # what the cache holds at the end, on the model's device
    kv_bytes_full: int  # what the full cache would hold for the same tokens
    host_bytes: int  # what the cache keeps in CPU memory (AKV's cold tier), not in kv_bytes
    stats: dict[str, Any] = field(default_factory=dict)  # the cache's stats(): per-layer counts under "layers"

    @property
    def layers(self) -> list[dict[str, Any]]:
        """Per layer: tokens seen, original, quantized, evicted (and the method's own figures)."""
        return self.stats["layers"]


def stream(model: PreTrainedModel, tokenizer: Any, prompt_or_messages: Prompt, method: str = "mix",
           max_new_tokens: int = 256, **options: Any) -> Iterator[StreamItem]:
    """Greedy decoding with the cache of `method`, one item per generated token (EOS ends it, unyielded).

    A string prompt is tokenized as is; a list of chat messages goes through the tokenizer's chat
    template. `options` are the method's (`cache_size=256`, ...; `arkv-bench list` shows them).
    Bad input raises ValueError here, not at the first item.
    """
    input_ids, cache, eos = _start(model, tokenizer, prompt_or_messages, method, max_new_tokens, options)
    return _items(model, tokenizer, input_ids, cache, max_new_tokens, eos)


def generate(model: PreTrainedModel, tokenizer: Any, prompt_or_messages: Prompt, method: str = "mix",
             max_new_tokens: int = 256, **options: Any) -> Result:
    """Greedy decoding with the cache of `method`: the same tokens `stream()` yields, with timings and memory."""
    input_ids, cache, eos = _start(model, tokenizer, prompt_or_messages, method, max_new_tokens, options)
    tokens, latencies = [], []
    for token, latency in _greedy(model, input_ids, cache, max_new_tokens, eos):
        tokens.append(token)
        latencies.append(latency)
    decode_s = sum(latencies[1:])
    return Result(text=tokenizer.decode(tokens, skip_special_tokens=True), token_ids=tokens,
                  prompt_tokens=input_ids.shape[1], finish_reason="length" if len(tokens) == max_new_tokens else "eos",
                  ttft_s=latencies[0] if latencies else None,
                  decode_tok_s=(len(tokens) - 1) / decode_s if len(tokens) > 1 and decode_s else None,
                  kv_bytes=cache.kv_bytes(), kv_bytes_full=cache.full_kv_bytes(), host_bytes=cache.host_bytes(),
                  stats=cache.stats())


def _items(model: PreTrainedModel, tokenizer: Any, input_ids: torch.Tensor, cache: BenchCache, max_new_tokens: int,
           eos: set[int]) -> Iterator[StreamItem]:
    text = Detokenizer(tokenizer)
    for token, latency in _greedy(model, input_ids, cache, max_new_tokens, eos):
        yield StreamItem(token_id=token, text=text.push(token), latency_s=latency, state=state_summary(cache))


def state_summary(cache: BenchCache) -> dict[str, float]:
    """Tokens per layer in each state, averaged over layers (and rows and heads)."""
    tiered = isinstance(cache.layers[0], AKVLayer)
    rows = [{**layer.counts(), **(layer.tier_counts() if tiered else {})} for layer in cache.layers]
    return {key: sum(r[key] for r in rows) / len(rows) for key in ("seen", *(TIERS if tiered else STATES))}


class Detokenizer:
    """Incremental text of a growing token list.

    New tokens are decoded together with the tokens printed just before them, so a word-initial
    space that some tokenizers render only after a previous token survives; text ending in U+FFFD
    (an incomplete UTF-8 sequence, e.g. half of an emoji's bytes) is held back until its last byte comes.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer, self.ids = tokenizer, []
        self.prefix = self.read = 0  # ids[prefix:read] is context already printed; ids[read:] is not printed yet

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]


def eos_ids(model: PreTrainedModel, tokenizer: Any) -> set[int]:
    """The model's end-of-sequence ids (its generation config's and the tokenizer's)."""
    config = getattr(model, "generation_config", None)
    eos = config.eos_token_id if config is not None else None
    eos = eos if isinstance(eos, list) else [eos]
    return {e for e in [*eos, tokenizer.eos_token_id] if e is not None}


def encode(tokenizer: Any, prompt_or_messages: Prompt) -> list[int]:
    """A string as is (with the special tokens the tokenizer adds by default); messages through the chat template."""
    if isinstance(prompt_or_messages, str):
        ids = tokenizer(prompt_or_messages).input_ids
    elif isinstance(prompt_or_messages, Sequence) and all(isinstance(m, dict) for m in prompt_or_messages):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template: pass the prompt as a string")
        ids = tokenizer.apply_chat_template(list(prompt_or_messages), add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]
    else:
        raise ValueError(f"the prompt must be a string or a list of chat messages (dicts), "
                         f"got {type(prompt_or_messages).__name__}")
    if not ids:
        raise ValueError("the prompt is empty: it must have at least one token")
    return list(ids)


def _start(model: PreTrainedModel, tokenizer: Any, prompt_or_messages: Prompt, method: str, max_new_tokens: int,
           options: dict[str, Any]) -> tuple[torch.Tensor, BenchCache, set[int]]:
    """Check everything before any work: the cache (method, options), the length, the prompt."""
    cache = make_cache(method, model.config, **options)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    input_ids = torch.tensor([encode(tokenizer, prompt_or_messages)], device=model.device)
    prepare_model(model)
    return input_ids, cache, eos_ids(model, tokenizer)


def _greedy(model: PreTrainedModel, input_ids: torch.Tensor, cache: BenchCache, max_new_tokens: int,
            eos: set[int]) -> Iterator[tuple[int, float]]:
    """(token, seconds of its forward pass) until EOS (not yielded) or `max_new_tokens`.

    Reading the token back to the host waits for the device, so each time covers the whole forward.
    """
    mask = torch.ones_like(input_ids)
    t0 = time.perf_counter()
    token = int(prefill(model, input_ids, mask, cache).argmax(-1))
    latency = time.perf_counter() - t0
    for step in range(max_new_tokens):
        if token in eos:
            return
        yield token, latency
        if step == max_new_tokens - 1:
            return
        t0 = time.perf_counter()
        logits, mask = extend(model, torch.tensor([[token]], device=input_ids.device), mask, cache)
        token = int(logits[0, -1].argmax(-1))
        latency = time.perf_counter() - t0
