"""RULER-style synthetic tasks (Hsieh et al., 2024), generated offline in tokens of the model under test.

The task definitions are RULER's (needle-in-a-haystack with one or several keys, values and
queries; variable tracking; common-words extraction) and so is the score: the share of the
expected strings found in the output. The filler, the words and every sentence are our own.
Each task's parameters live in tasks/ruler.yaml.

Like passkey, a prompt is sized in tokens of the model under test (chat template included when
used), and an insert's depth is the fraction of prompt tokens before it. Every prompt is
``context + question`` (``Sample.question``), so that the context can be prefilled and compressed
alone (--protocol query-agnostic); questions on one context share its ``extra["context_id"]`` and,
in a query-agnostic run, one compressed copy of it.
"""

from __future__ import annotations

import bisect
import itertools
import random
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from arkv_bench.suites._ruler_words import ADJECTIVES, NOUNS, PLACES, TIMES, VERBS_PAST
from arkv_bench.options import RunOptions
from arkv_bench.options import UsageError
from arkv_bench.suites.base import Context, PromptSuite, Sample
from arkv_bench.suites.passkey import FILLER_SENTENCES, LENGTH_TOLERANCE, _Measurer, _validate
from arkv_bench.tasks import TaskSpec

KINDS = ("niah", "vt", "cwe")
HAYSTACKS = ("noise", "prose", "needles")
KEY_TYPES = ("word", "uuid")
VALUE_TYPES = ("number", "uuid")
VALUE_NAMES = {"number": "number", "uuid": "code"}


@dataclass(frozen=True)
class RulerTask:
    """One task's definition (tasks/ruler.yaml, ``extra``); each kind reads its own fields.

    niah: ``haystack`` of filler; ``keys`` needles with distinct keys, of which ``queries`` are
    asked (the others are distractors); ``values`` needles per asked key. vt: ``chains`` chains of
    ``hops`` assignments, one asked. cwe: ``common`` words ``freq_common`` times each among others
    ``freq_rare`` times each.
    """

    kind: str
    haystack: str = "prose"
    key: str = "word"
    value: str = "number"
    keys: int = 1
    values: int = 1
    queries: int = 1
    ask_together: bool = False  # multi-query: one question for every key (RULER) or one question each
    chains: int = 1
    hops: int = 4
    common: int = 10
    freq_common: int = 30
    freq_rare: int = 3

    @classmethod
    def from_extra(cls, name: str, extra: dict[str, Any]) -> RulerTask:
        known = {f.name for f in fields(cls)}
        params = {k: v for k, v in extra.items() if k in known}
        task = cls(**params)
        task.check(name)
        return task

    def check(self, name: str) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"ruler task {name!r}: {what}; fix tasks/ruler.yaml")

        need(self.kind in KINDS, f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        need(self.haystack in HAYSTACKS, f"haystack must be one of {', '.join(HAYSTACKS)}")
        need(self.key in KEY_TYPES and self.value in VALUE_TYPES, "key must be word|uuid and value number|uuid")
        for count in ("keys", "values", "queries", "chains", "hops", "common", "freq_common", "freq_rare"):
            value = getattr(self, count)
            need(isinstance(value, int) and value >= 1, f"{count} must be an integer >= 1")
        need(self.queries <= self.keys, "queries must not exceed keys")
        need(self.freq_common > self.freq_rare, "freq_common must exceed freq_rare")


@dataclass
class Draft:
    """One context before sizing: intro, filler units (as many as may be needed), inserts and questions."""

    intro: str
    units: list[str]
    inserts: list[str] = field(default_factory=list)
    depths: list[float] = field(default_factory=list)  # where each insert goes (fraction of prompt tokens)
    questions: list[tuple[str, list[str], list[int]]] = field(default_factory=list)  # text, answers, its inserts


# --- words and values -----------------------------------------------------------------------------

def _word_keys(rng: random.Random, n: int) -> list[str]:
    """n distinct adjective-noun keys."""
    picks = rng.sample(range(len(ADJECTIVES) * len(NOUNS)), n)
    return [f"{ADJECTIVES[i // len(NOUNS)]}-{NOUNS[i % len(NOUNS)]}" for i in picks]


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _distinct(make: Callable[[], str], n: int) -> list[str]:
    out: dict[str, None] = {}
    while len(out) < n:
        out[make()] = None
    return list(out)


def _keys(task: RulerTask, rng: random.Random, n: int) -> list[str]:
    return _word_keys(rng, n) if task.key == "word" else _distinct(lambda: _uuid(rng), n)


def _values(task: RulerTask, rng: random.Random, n: int) -> list[str]:
    make = (lambda: str(rng.randint(10**6, 10**7 - 1))) if task.value == "number" else (lambda: _uuid(rng))
    return _distinct(make, n)


def _prose_sentence(rng: random.Random) -> str:
    return (f"The {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS_PAST)} the "
            f"{rng.choice(NOUNS)} {rng.choice(PLACES)} {rng.choice(TIMES)}.")


# --- the three kinds ------------------------------------------------------------------------------

def _needle(task: RulerTask, key: str, value: str) -> str:
    return f"One of the hidden {VALUE_NAMES[task.value]}s for {key} is {value}."


def _niah_question(task: RulerTask, asked: list[str]) -> str:
    kind = VALUE_NAMES[task.value]
    names = ", ".join(asked[:-1]) + f" and {asked[-1]}" if len(asked) > 1 else asked[0]
    return (f"\n\nWhat are all the hidden {kind}s for {names} in the text above?\n"
            f"Answer: The hidden {kind}s for {names} in the text are")


def _niah(task: RulerTask, rng: random.Random, depth: float, cap: int) -> Draft:
    kind = VALUE_NAMES[task.value]
    intro = f"Some hidden {kind}s are placed in the text below. Remember them: you will be asked about them afterwards."
    n_filler_keys = cap if task.haystack == "needles" else 0
    keys = _keys(task, rng, task.keys + n_filler_keys)
    needle_keys, filler_keys = keys[:task.keys], keys[task.keys:]
    values = _values(task, rng, task.keys * task.values + n_filler_keys)
    if task.haystack == "noise":
        units = [FILLER_SENTENCES[i % len(FILLER_SENTENCES)] for i in range(cap)]
    elif task.haystack == "prose":
        units = [_prose_sentence(rng) for _ in range(cap)]
    else:
        units = [_needle(task, k, v) for k, v in zip(filler_keys, values[task.keys * task.values:])]
    draft = Draft(intro=intro, units=units)
    by_key: dict[str, tuple[list[str], list[int]]] = {}
    for i, key in enumerate(needle_keys):
        own = values[i * task.values:(i + 1) * task.values]
        slots = []
        for j, value in enumerate(own):
            draft.inserts.append(_needle(task, key, value))
            draft.depths.append(depth if i == 0 and j == 0 else rng.random())
            slots.append(len(draft.inserts) - 1)
        by_key[key] = (own, slots)
    asked = needle_keys[:task.queries]
    groups = [asked] if task.ask_together else [[k] for k in asked]
    for group in groups:
        answers = [v for k in group for v in by_key[k][0]]
        slots = [s for k in group for s in by_key[k][1]]
        draft.questions.append((_niah_question(task, group), answers, slots))
    return draft


def _variable_name(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(5))


def _vt(task: RulerTask, rng: random.Random, depth: float, cap: int) -> Draft:
    intro = "Memorize the variable assignments in the text below. You will be asked to follow them."
    names = _distinct(lambda: _variable_name(rng), task.chains * (task.hops + 1))
    values = _distinct(lambda: str(rng.randint(10**4, 10**5 - 1)), task.chains)
    draft = Draft(intro=intro, units=[FILLER_SENTENCES[i % len(FILLER_SENTENCES)] for i in range(cap)])
    for c in range(task.chains):
        chain = names[c * (task.hops + 1):(c + 1) * (task.hops + 1)]
        first = depth if c == 0 else rng.random()
        later = sorted(rng.uniform(first, 1.0) for _ in range(task.hops))
        for i, (name, at) in enumerate(zip(chain, [first, *later])):
            draft.inserts.append(f"VAR {name} = {values[c] if i == 0 else 'VAR ' + chain[i - 1]}.")
            draft.depths.append(at)
    asked = names[:task.hops + 1]
    question = (f"\n\nWhich variables are assigned the value {values[0]}, directly or through other variables, "
                f"in the text above?\nAnswer: The variables assigned the value {values[0]} are")
    draft.questions.append((question, asked, list(range(task.hops + 1))))
    return draft


def _cwe_words(task: RulerTask, rng: random.Random, n_rare: int) -> tuple[list[str], list[str]]:
    """The common words and the shuffled list (common ones freq_common times, n_rare others freq_rare times)."""
    vocabulary = sorted(set(ADJECTIVES) | set(NOUNS))
    if task.common + n_rare > len(vocabulary):
        raise ValueError(f"cwe needs {task.common + n_rare} distinct words but the vocabulary has {len(vocabulary)}: "
                         "use a shorter context length for this task")
    chosen = rng.sample(vocabulary, task.common + n_rare)
    common, rare = chosen[:task.common], chosen[task.common:]
    listing = common * task.freq_common + rare * task.freq_rare
    rng.shuffle(listing)
    return common, listing


def _cwe_prompt(task: RulerTask, listing: list[str]) -> tuple[str, str]:
    context = ("Below is a numbered list of words. Some words appear more often than others; "
               "remember which ones.\n\n" + " ".join(f"{i + 1}. {w}" for i, w in enumerate(listing)))
    question = (f"\n\nWhat are the {task.common} most common words in the list above?\n"
                f"Answer: The {task.common} most common words in the list are:")
    return context, question


# --- sizing ---------------------------------------------------------------------------------------

def _fit(measure: Callable[[int], int], target: int, hi: int) -> int:
    """The count n in [0, hi] whose prompt length measure(n) is nearest target (measure grows with n)."""
    lo, top = 0, hi
    while lo < top:
        mid = (lo + top + 1) // 2
        if measure(mid) <= target:
            lo = mid
        else:
            top = mid - 1
    if lo < hi and abs(measure(lo + 1) - target) < abs(measure(lo) - target):
        return lo + 1
    return lo


def _render(draft: Draft, n: int, at: list[int]) -> tuple[str, list[int]]:
    """The context with n filler units and insert i before unit at[i]; returns (text, insert char offsets)."""
    head = f"{draft.intro}\n\n"
    parts: list[str] = []
    offsets = [0] * len(draft.inserts)
    pos = len(head)
    order = sorted(range(len(draft.inserts)), key=lambda i: (at[i], draft.depths[i], i))
    k = 0
    for unit_index in range(n + 1):
        while k < len(order) and at[order[k]] == unit_index:
            offsets[order[k]] = pos
            parts.append(draft.inserts[order[k]])
            pos += len(parts[-1]) + 1
            k += 1
        if unit_index < n:
            parts.append(draft.units[unit_index])
            pos += len(parts[-1]) + 1
    return head + " ".join(parts), offsets


def _place(m: _Measurer, draft: Draft, n: int, question: str) -> list[int]:
    """The unit boundary of each insert whose first token index is nearest depth x prompt tokens.

    Token counts of units add up (as for passkey's filler); the inserts are placed shallowest first,
    each shifted by the tokens of the inserts already before it.
    """
    tok = m.tok
    unit_tokens = [len(ids) for ids in tok([" " + u for u in draft.units[:n]], add_special_tokens=False)["input_ids"]]
    insert_tokens = [len(ids) for ids in tok([" " + s for s in draft.inserts], add_special_tokens=False)["input_ids"]]
    text, offsets = _render(draft, n, [0] * len(draft.inserts))
    head = m.needle_index(text + question, offsets[0])  # tokens before the first boundary
    total = m.count(text + question)  # where the inserts go does not change the total
    cumulative = list(itertools.accumulate(unit_tokens, initial=0))
    at = [0] * len(draft.inserts)
    before = previous = 0
    for i in sorted(range(len(draft.inserts)), key=lambda i: draft.depths[i]):
        goal = draft.depths[i] * total - head - before
        k = bisect.bisect_left(cumulative, goal)
        k = k if k == 0 or (k <= n and cumulative[k] - goal < goal - cumulative[k - 1]) else k - 1
        at[i] = previous = max(k, previous)  # never before a shallower insert: chains keep their order
        before += insert_tokens[i]
    return at


def _sized_draft(m: _Measurer, draft_of: Callable[[int], Draft], length: int) -> tuple[Draft, int, list[int]]:
    """The draft, its filler count and insert boundaries for a prompt of ~length tokens."""
    cap = max(length // 3, 16)  # every filler unit is at least 3 tokens
    draft = draft_of(cap)
    question = draft.questions[0][0]
    zeros = [0] * len(draft.inserts)
    sample = draft.units[:64]
    per_unit = sum(len(ids) for ids in m.tok(sample, add_special_tokens=False)["input_ids"]) / len(sample)
    hi = min(len(draft.units), round(1.25 * length / per_unit) + 8)  # search no further than needed
    n = _fit(lambda k: m.count(_render(draft, k, zeros)[0] + question), length, hi)
    return draft, n, _place(m, draft, n, question)


def _check_length(length: int, tokens: int, what: str) -> None:
    if abs(tokens - length) > LENGTH_TOLERANCE * length:
        raise ValueError(f"could not fit a {length}-token {what} prompt (got {tokens}); the context length is "
                         "too short for this task or the tokenizer too unusual")


# --- samples --------------------------------------------------------------------------------------

def _cell_rng(seed: int, task: str, length: int, slot: str) -> random.Random:
    """Each cell draws from its own stream: adding a length or depth leaves the other cells unchanged."""
    return random.Random(f"{seed}/{task}/{length}/{slot}")


def _needle_samples(m: _Measurer, name: str, task: RulerTask, length: int, depth: float, s: int, seed: int,
                    max_new_tokens: int) -> list[Sample]:
    rng = _cell_rng(seed, name, length, f"{depth:.4f}/{s}")
    make = _niah if task.kind == "niah" else _vt
    draft, n, at = _sized_draft(m, lambda cap: make(task, rng, depth, cap), length)
    context, offsets = _render(draft, n, at)
    context_id = f"{name}-len{length}-d{depth:.2f}-s{s}"
    samples = []
    for q, (question, answers, slots) in enumerate(draft.questions):
        prompt = context + question
        tokens = m.count(prompt)
        _check_length(length, tokens, name)
        suffix = f"-q{q}" if len(draft.questions) > 1 else ""
        samples.append(Sample(
            sample_id=context_id + suffix, prompt=prompt, question=question, references=answers,
            max_new_tokens=max_new_tokens,
            extra={"task": name, "context_length": length, "depth": depth, "prompt_tokens": tokens,
                   "needle_token_depths": [round(m.needle_index(prompt, offsets[i]) / tokens, 4) for i in slots],
                   "context_id": context_id}))
    return samples


def _cwe_samples(m: _Measurer, name: str, task: RulerTask, length: int, slot: int, seed: int,
                 max_new_tokens: int) -> list[Sample]:
    rng = _cell_rng(seed, name, length, str(slot))
    state = rng.getstate()

    def prompt_of(n_rare: int) -> tuple[str, str, list[str]]:
        rng.setstate(state)
        common, listing = _cwe_words(task, rng, n_rare)
        return *_cwe_prompt(task, listing), common

    limit = len(set(ADJECTIVES) | set(NOUNS)) - task.common
    n = _fit(lambda k: m.count("".join(prompt_of(k)[:2])), length, limit)
    context, question, common = prompt_of(n)
    tokens = m.count(context + question)
    _check_length(length, tokens, name)
    sample_id = f"{name}-len{length}-s{slot}"
    return [Sample(sample_id=sample_id, prompt=context + question, question=question, references=common,
                   max_new_tokens=max_new_tokens, extra={"task": name, "context_length": length, "depth": None,
                                                         "prompt_tokens": tokens, "context_id": sample_id})]


def make_ruler_samples(tokenizer: Any, name: str, task: RulerTask, context_lengths: list[int], depths: list[float],
                       samples_per_cell: int = 1, seed: int = 0, chat_template: bool = False,
                       max_new_tokens: int = 128) -> list[Sample]:
    """The prompts of one RULER task for every (length, depth) cell, deterministic for a seed.

    cwe has no needle: it makes as many samples per length as the other tasks (depths x samples_per_cell).
    """
    _validate(context_lengths, depths, samples_per_cell)
    m = _Measurer(tokenizer, chat_template)
    samples: list[Sample] = []
    for length in context_lengths:
        if task.kind == "cwe":
            for slot in range(len(depths) * samples_per_cell):
                samples += _cwe_samples(m, name, task, length, slot, seed, max_new_tokens)
            continue
        for depth in depths:
            for s in range(samples_per_cell):
                samples += _needle_samples(m, name, task, length, float(depth), s, seed, max_new_tokens)
    return samples


# --- entry points for the suite registry ------------------------------------------------------

def build(spec: TaskSpec, options: RunOptions, tokenizer: Any, chat: bool) -> list[Sample]:
    """The prompts of one task of tasks/ruler.yaml (command-line lengths, depths and counts win)."""
    extra = spec.extra
    task = RulerTask.from_extra(spec.name, extra)
    samples = make_ruler_samples(
        tokenizer, spec.name, task, options.context_lengths or list(extra["context_lengths"]),
        options.depths or list(extra["depths"]), options.samples_per_cell or extra.get("samples_per_cell", 1),
        options.seed, chat, spec.max_new_tokens)
    return samples if options.limit is None else samples[:options.limit]


def ruler_score(prediction: str, references: list[str]) -> float:
    """RULER's string match: the share of the expected strings found in the output (case-insensitive)."""
    text = prediction.lower()
    return sum(r.lower() in text for r in references) / len(references)


def context_and_question(sample: Sample) -> tuple[str, str]:
    """The prompt split where the question begins (the context ends on a sentence, the question starts
    with a blank line, so byte-level BPE tokenizers never merge a token across the split)."""
    return sample.prompt[:len(sample.prompt) - len(sample.question)], sample.question


class Ruler(PromptSuite):
    name = "ruler"
    description = "RULER-style synthetic long-context tasks: needles, variable tracking, common words (offline)"

    def load(self, spec: TaskSpec, opts: RunOptions) -> None:
        try:
            RulerTask.from_extra(spec.name, spec.extra)
        except ValueError as e:
            raise UsageError(str(e)) from None

    def build(self, spec: TaskSpec, ctx: Context, chat: bool) -> list[Sample]:
        try:
            return build(spec, ctx.opts, ctx.tokenizer, chat)
        except ValueError as e:  # a length a task cannot be fitted to
            raise UsageError(f"ruler/{spec.name}: {e}") from None

    def score(self, spec: TaskSpec, sample: Sample, prediction: str) -> float:
        return ruler_score(prediction, sample.references)


SUITE = Ruler()
