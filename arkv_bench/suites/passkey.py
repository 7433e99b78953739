"""Passkey retrieval prompts: a 5-digit key hidden at a chosen depth inside filler text.

Prompts are sized in *tokens of the model under test* (chat template included when used), so
a "4K" cell really is ~4096 tokens for that model, and the needle's position is reported as
the fraction of prompt tokens that precede it. The filler is our own wording.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Any

from arkv_bench.suites.base import Context, PromptSuite, Sample, limited
from arkv_bench.tasks import TaskSpec

MIN_CONTEXT_LENGTH = 200
LENGTH_TOLERANCE = 0.05

# Naming the pass key and its form up front matters for small chat models: with a vaguer
# "important information" intro SmolLM2-135M-Instruct answers from imagination far more often.
INTRO = (
    "Somewhere in the text below there is a pass key, a five-digit number. "
    "Find it and remember it. At the end you will be asked for the pass key."
)
# Short sentences keep the needle close to the requested depth (it sits on a sentence boundary).
FILLER_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is warm.",
    "Birds sing in the trees.",
    "The river flows on.",
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


@dataclass
class PasskeySample:
    """One prompt; ``prompt`` is the user message text, before any chat template."""

    sample_id: str
    prompt: str
    key: str
    context_length: int
    depth: float
    prompt_tokens: int
    needle_token_depth: float


def build_prompt(n_filler: int, needle_after: int, key: str) -> tuple[str, int]:
    """The user text with ``n_filler`` filler sentences, the needle after ``needle_after`` of them.

    Returns ``(text, needle_char_offset)``.
    """
    filler = [FILLER_SENTENCES[i % len(FILLER_SENTENCES)] for i in range(n_filler)]
    k = max(0, min(needle_after, n_filler))
    before = f"{INTRO}\n\n" + "".join(f"{s} " for s in filler[:k])
    after = " ".join(filler[k:])
    text = before + NEEDLE.format(key=key) + (f" {after}" if after else "") + f"\n\n{QUESTION}"
    return text, len(before)


class _Measurer:
    """Counts prompt tokens and finds the needle's token index, with or without chat template."""

    def __init__(self, tokenizer: Any, chat_template: bool):
        if chat_template and not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat_template=True but the tokenizer has no chat template")
        self.tok = tokenizer
        self.chat = chat_template

    def render(self, text: str) -> tuple[str, int]:
        """The exact string that gets tokenized, and where the user text starts inside it."""
        if not self.chat:
            return text, 0
        rendered = self.tok.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        return rendered, rendered.index(text)

    def count(self, text: str) -> int:
        """Prompt length as the model will see it (the official number we report)."""
        if self.chat:
            ids = self.tok.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
            )
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return len(ids)
        return len(self.tok(text)["input_ids"])

    def needle_index(self, text: str, needle_char: int) -> int:
        """Token index where the needle starts (the first token reaching into it)."""
        rendered, start = self.render(text)
        pos = start + needle_char
        special = not self.chat  # the template already wrote its special tokens as text
        try:
            enc = self.tok(rendered, add_special_tokens=special, return_offsets_mapping=True)
        except (NotImplementedError, ValueError, TypeError):  # slow tokenizers: count the prefix
            return len(self.tok(rendered[:pos].rstrip(" "), add_special_tokens=special)["input_ids"])
        for i, (_, end) in enumerate(enc["offset_mapping"]):
            if end > pos:
                return i
        return len(enc["input_ids"])


def _sentence_tokens(tokenizer: Any) -> list[int]:
    """Tokens each filler sentence adds (with its leading space); additive for BPE tokenizers."""
    return [len(tokenizer(" " + s, add_special_tokens=False)["input_ids"]) for s in FILLER_SENTENCES]


def _fit_filler_count(m: _Measurer, target: int, per_sentence: list[int], key: str) -> int:
    """How many filler sentences bring the whole prompt closest to ``target`` tokens.

    Estimate from the empty prompt plus per-sentence counts, then correct with a few real
    measurements (a handful of tokenizer calls, not a scan).
    """
    avg = sum(per_sentence) / len(per_sentence)
    overhead = m.count(build_prompt(0, 0, key)[0])
    n = max(0, round((target - overhead) / avg))
    best_n, best_err = n, None
    for _ in range(8):
        err = target - m.count(build_prompt(n, n // 2, key)[0])
        if best_err is None or abs(err) < abs(best_err):
            best_n, best_err = n, err
        step = round(err / avg)
        if step == 0:
            break
        n = max(0, n + step)
    return best_n


def _place_needle(m: _Measurer, n: int, depth: float, key: str, per_sentence: list[int]) -> int:
    """The sentence boundary whose needle token index is nearest ``depth`` * prompt tokens."""
    text, char = build_prompt(n, 0, key)
    head = m.needle_index(text, char)  # tokens before the needle when it follows the intro
    total = m.count(text)  # the needle's position does not change the total
    cumulative = list(itertools.accumulate((per_sentence[i % len(per_sentence)] for i in range(n)), initial=0))
    goal = depth * total
    k = min(range(n + 1), key=lambda j: abs(head + cumulative[j] - goal))
    # correct for any non-additivity with one real measurement
    text, char = build_prompt(n, k, key)
    off = m.needle_index(text, char) - (head + cumulative[k])
    if off:
        k = min(range(n + 1), key=lambda j: abs(head + off + cumulative[j] - goal))
    return k


def _validate(context_lengths: list[int], depths: list[float], samples_per_cell: int) -> None:
    if not context_lengths or not depths:
        raise ValueError("context_lengths and depths must be non-empty")
    for length in context_lengths:
        if not isinstance(length, int) or length < MIN_CONTEXT_LENGTH:
            raise ValueError(f"context length {length!r} must be an int >= {MIN_CONTEXT_LENGTH} tokens")
    for d in depths:
        if not 0.0 <= float(d) <= 1.0:
            raise ValueError(f"depth {d!r} must be within [0, 1]")
    if samples_per_cell < 1:
        raise ValueError("samples_per_cell must be >= 1")


def make_passkey_samples(
    tokenizer: Any,
    context_lengths: list[int],
    depths: list[float],
    samples_per_cell: int = 1,
    seed: int = 0,
    chat_template: bool = True,
) -> list[PasskeySample]:
    """Passkey prompts for every (length, depth) cell, deterministic for a given seed.

    Lengths are hit within 5% (as measured with the chat template when ``chat_template``);
    depth 0 and 1 put the needle right after the intro / right before the question.
    """
    _validate(context_lengths, depths, samples_per_cell)
    m = _Measurer(tokenizer, chat_template)
    per_sentence = _sentence_tokens(tokenizer)
    rng = random.Random(seed)
    samples: list[PasskeySample] = []
    for length in context_lengths:
        n = _fit_filler_count(m, length, per_sentence, "00000")
        for depth in depths:
            k = _place_needle(m, n, float(depth), "00000", per_sentence)
            for s in range(samples_per_cell):
                key = str(rng.randint(10000, 99999))
                text, char = build_prompt(n, k, key)
                tokens = m.count(text)
                if abs(tokens - length) > LENGTH_TOLERANCE * length:
                    raise ValueError(f"could not fit a {length}-token prompt (got {tokens}); tokenizer too unusual")
                samples.append(
                    PasskeySample(
                        sample_id=f"len{length}-d{float(depth):.2f}-s{s}",
                        prompt=text,
                        key=key,
                        context_length=length,
                        depth=float(depth),
                        prompt_tokens=tokens,
                        needle_token_depth=m.needle_index(text, char) / tokens,
                    )
                )
    return samples


class Passkey(PromptSuite):
    name = "passkey"
    description = "a five-digit key hidden in filler text at set lengths and depths (generated, offline)"

    def build(self, spec: TaskSpec, ctx: Context, chat: bool) -> list[Sample]:
        opts, extra = ctx.opts, spec.extra
        made = make_passkey_samples(ctx.tokenizer, opts.context_lengths or list(extra["context_lengths"]),
                                    opts.depths or list(extra["depths"]),
                                    opts.samples_per_cell or extra.get("samples_per_cell", 1), opts.seed, chat)
        samples = [Sample(sample_id=s.sample_id, prompt=s.prompt, references=[s.key],
                          max_new_tokens=spec.max_new_tokens, question=f"\n\n{QUESTION}",
                          extra={"context_length": s.context_length, "depth": s.depth,
                                 "needle_token_depth": s.needle_token_depth}) for s in made]
        return limited(samples, opts.limit)


SUITE = Passkey()
