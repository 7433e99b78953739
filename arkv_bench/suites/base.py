"""What a suite is: the protocol every suite implements, and the base of the prompt suites.

A suite is one file under arkv_bench/suites/ that defines `SUITE`, an instance of a `Suite`
subclass; the registry (arkv_bench/suites/__init__.py) finds it by that name. The runner and
`tune` drive every suite the same way:

    suite.check(opts)                         before the model loads: names and options (UsageError)
    tasks = suite.plan(ctx)                   the prompts (their data read: DataError)
    suite.batches(ctx, task, method, size, records)  the work not yet among the configuration's records
    suite.run(ctx, task, batch, method, size) -> [SampleRecord]

`ctx.protocol` says how a prompt meets the cache (arkv_bench/protocols.py): query-aware prefills it
whole; query-agnostic compresses its context alone, so every prompt suite declares where its question
begins (`Sample.question`, the text the prompt ends with).

`PromptSuite` is the base of the suites declared in tasks/<suite>.yaml: a subclass says how a
task's rows become prompts (`build`) and, where the metric is not a named one, how to score.
"""

from __future__ import annotations

import copy
import fnmatch
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from arkv_bench.budgets import budget_for, cache_options
from arkv_bench.cache import make_cache
from arkv_bench.generation import Generation, clock, extend, greedy_generate, left_pad, prefill
from arkv_bench.measures import PeakMemory, row_decode
from arkv_bench.metrics import gsm8k_score, longbench_sample_score, mean_ci95, passkey_score
from arkv_bench.models import model_devices
from arkv_bench.options import RunOptions, UsageError
from arkv_bench.protocols import QUERY_AGNOSTIC, QUERY_AWARE, compress_context, generate_after_context, question_token
from arkv_bench.results import SampleRecord, evicted_quantized, layer_vector
from arkv_bench.shared_prefill import generate_from, needs_accumulated, record_prompt, shares_prefill
from arkv_bench.tasks import TaskSpec, load_task_specs

# With a chat template the prompt ends "Answer:" + the template's closing tokens; the last few tokens
# go through the compressed cache after prefill, as the tail does without a template.
CHAT_TAIL_TOKENS = 8


class DataError(UsageError):
    """A dataset that cannot be read: the message says which and how to provide it."""


@dataclass
class Sample:
    """One prompt. `prompt` is the user text before any chat template.

    Generation tasks compare the output with `references`. Log-likelihood tasks (`choices`
    set) feed `tail` through the cache after the prompt and pick the likeliest choice.
    """

    sample_id: str
    prompt: str
    references: list[str]
    max_new_tokens: int
    choices: list[str] | None = None
    tail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    ids: list[int] | None = None  # the prompt's token ids (template included), set once by the suite's plan
    question: str = ""  # the end of `prompt` that is the question (and answer prefix); what precedes it is context
    context_tokens: int | None = None  # ids[:context_tokens] is the context (set by plan for query-agnostic runs)


@dataclass
class Context:
    """A loaded model and the run's options: what a suite runs with."""

    model: Any
    tokenizer: Any
    opts: RunOptions
    info: dict[str, Any]
    eos: list[int]
    protocol: str = QUERY_AWARE  # the runner sets each of opts.protocols in turn
    # query-agnostic: the last compressed context, {key: (cache, mask)}, reused by the next question on it
    contexts: dict[tuple, tuple[Any, torch.Tensor]] = field(default_factory=dict)
    # shared prefill: the last batch's recorded prompt, {key: PromptRecord}, reused by every configuration
    records: dict[tuple, Any] = field(default_factory=dict)


@dataclass
class Task:
    """One planned task: its samples (empty where the suite builds its own requests, as lm-eval does)."""

    name: str
    chat: bool
    samples: list[Sample] = field(default_factory=list)
    spec: Any = None


@dataclass
class Batch:
    """Work run at once: some samples, worth `units` steps of the progress bar."""

    samples: list[Sample]
    units: int


class Suite(ABC):
    """A benchmark suite: its tasks, their prompts (or requests) and how one batch runs."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True  # False where the score is a loss (perplexity)
    query_agnostic: ClassVar[bool] = False  # whether its prompts declare a question to hold back (--protocol)

    def summary_score(self, records: list[dict[str, Any]]) -> tuple[float | None, float | None]:
        """summary.csv's (score, score_ci95) of one configuration's ok records: the mean in percent."""
        scored = [r["score"] for r in records if r.get("score") is not None]  # lm-eval corpus metrics have none
        if not scored:
            return None, None
        mean, half = mean_ci95(scored)
        return round(100 * mean, 4), round(100 * half, 4)

    @abstractmethod
    def task_names(self) -> list[str]:
        """The tasks `arkv-bench list` shows."""

    @abstractmethod
    def check(self, opts: RunOptions) -> None:
        """Every check that needs no model (raises UsageError)."""

    @abstractmethod
    def plan(self, ctx: Context) -> list[Task]:
        """The tasks of this run with their samples (raises DataError for unreadable data)."""

    @abstractmethod
    def batches(self, ctx: Context, task: Task, method: str, size: int | float | None,
                records: list[dict[str, Any]]) -> list[Batch]:
        """The batches of `task` whose results are not among `records` (this configuration's so far)."""

    @abstractmethod
    def run(self, ctx: Context, task: Task, batch: Batch, method: str, size: int | float | None
            ) -> list[SampleRecord]:
        """Run one batch with one method and cache size; its records."""

    def units(self, task: Task) -> int:
        """Progress steps of one task under one configuration."""
        return len(task.samples)

    def oom(self, ctx: Context, task: Task, batch: Batch, method: str, size: int | float | None
            ) -> list[SampleRecord]:
        """The records of a batch that ran out of memory."""
        return [SampleRecord(suite=self.name, task=task.name, sample_id=s.sample_id, quant_type=method,
                             cache_size=size, window_size=ctx.opts.window_size, status="oom",
                             references=s.references, protocol=ctx.protocol) for s in batch.samples]


def limited(rows: list[Any], limit: int | None) -> list[Any]:
    return rows if limit is None else rows[:limit]


# --- suites of prompts declared in tasks/<suite>.yaml ------------------------------------------------

class PromptSuite(Suite):
    """Prompts built from a task's rows, answered by generation or by log-likelihood of choices."""

    extra_files: ClassVar[tuple[str, ...]] = ()  # more tasks/*.yaml files whose tasks belong to this suite
    query_agnostic = True

    def load(self, spec: TaskSpec, opts: RunOptions) -> None:
        """Read and check the task's data before the model loads (suites that read data override this)."""

    @abstractmethod
    def build(self, spec: TaskSpec, ctx: Context, chat: bool) -> list[Sample]:
        """The prompts of one task (ctx.opts holds the suite's options, e.g. limit, num_fewshot)."""

    def default_tasks(self, specs: dict[str, TaskSpec]) -> list[TaskSpec]:
        """The tasks run when --tasks is not given."""
        return list(specs.values())

    def score(self, spec: TaskSpec, sample: Sample, prediction: str) -> float:
        """One answer's score in [0, 1], with the task's metric."""
        if spec.metric == "passkey":
            return passkey_score(prediction, sample.references[0])
        if spec.metric == "gsm8k":
            return gsm8k_score(prediction, sample.references[0])
        if spec.metric == "accuracy":
            return float(prediction.strip() == sample.references[0])
        return longbench_sample_score(spec.name, prediction, sample.references, sample.extra.get("all_classes"))

    def specs(self) -> dict[str, TaskSpec]:
        specs = load_task_specs(self.name)
        for extra in self.extra_files:
            specs.update(load_task_specs(extra))
        return specs

    def task_names(self) -> list[str]:
        return list(self.specs())

    def selected(self, wanted: list[str] | None) -> list[TaskSpec]:
        """Tasks by name or glob (`*_e`); by default the suite's default tasks."""
        specs = self.specs()
        if not wanted:
            return self.default_tasks(specs)
        chosen: list[TaskSpec] = []
        for pattern in wanted:
            hits = [s for name, s in specs.items() if fnmatch.fnmatchcase(name, pattern)]
            if not hits:
                raise UsageError(f"unknown task {pattern!r} for suite {self.name}; valid: {', '.join(specs)}")
            chosen += [h for h in hits if h not in chosen]
        return chosen

    def check(self, opts: RunOptions) -> None:
        for spec in self.selected(opts.tasks):
            self.load(spec, opts)

    def plan(self, ctx: Context) -> list[Task]:
        tasks = []
        for spec in self.selected(ctx.opts.tasks):
            chat = wants_chat(ctx.opts, spec, ctx.tokenizer)
            try:
                samples = self.build(spec, ctx, chat)
            except (KeyError, IndexError, TypeError, AttributeError) as e:  # a row that is not in the Hub schema
                where = f"--data-dir {ctx.opts.data_dir}" if ctx.opts.data_dir else spec.hub_id
                raise DataError(f"{self.name}/{spec.name}: the rows from {where} are not in the Hub schema "
                                f"({type(e).__name__}: {e}); fix the file to have the dataset's fields") from e
            for sample in samples:
                sample.ids = encode(ctx.tokenizer, sample.prompt + sample.tail, chat)
                if QUERY_AGNOSTIC in ctx.opts.protocols:
                    sample.context_tokens = question_token(ctx.tokenizer, chat, sample.prompt + sample.tail,
                                                           sample.question)
            tasks.append(Task(name=spec.name, chat=chat, samples=samples, spec=spec))
        check_lengths(ctx, tasks)
        return tasks

    def batches(self, ctx: Context, task: Task, method: str, size: int | float | None,
                records: list[dict[str, Any]]) -> list[Batch]:
        done = {str(r.get("sample_id")) for r in records if r.get("task") == task.name}
        todo = [s for s in task.samples if s.sample_id not in done]
        # a fraction gives each prompt its own budget, a choice is scored one prompt at a time, and a
        # query-agnostic prompt runs alone (its context may be shared with the next one)
        alone = isinstance(size, float) or (todo and todo[0].choices) or ctx.protocol == QUERY_AGNOSTIC
        step = 1 if alone else ctx.opts.batch_size
        return [Batch(samples=todo[i:i + step], units=len(todo[i:i + step])) for i in range(0, len(todo), step)]

    def run(self, ctx: Context, task: Task, batch: Batch, method: str, size: int | float | None
            ) -> list[SampleRecord]:
        if ctx.protocol == QUERY_AGNOSTIC:
            return self.run_after_context(ctx, task, batch.samples[0], method, size)
        tok, opts, samples = ctx.tokenizer, ctx.opts, batch.samples
        encoded = [s.ids or encode(tok, s.prompt + s.tail, task.chat) for s in samples]
        budget = budget_for(size, len(encoded[0]), method, opts.window_size, opts.method_options)
        cache = make_cache(method, ctx.model.config, attention_kernel=opts.attention_kernel,
                           **cache_options(method, budget, opts.window_size, opts.method_options))
        memory = PeakMemory(model_devices(ctx.model))
        if samples[0].choices:
            n_tail = len(tok(samples[0].tail, add_special_tokens=False).input_ids) if not task.chat else CHAT_TAIL_TOKENS
            answer, gen = choose(ctx, encoded[0], n_tail, samples[0].choices, cache)
            predictions = [answer]
        else:
            input_ids, mask = left_pad(encoded, tok.pad_token_id or 0, ctx.model.device)
            stop = _stopper(tok, task.spec.stop)
            if opts.shared_prefill and shares_prefill(method):
                record = _record(ctx, task, samples, input_ids, mask)
                gen = generate_from(ctx.model, record, cache, samples[0].max_new_tokens, ctx.eos, stop, opts.compile)
            else:
                gen = greedy_generate(ctx.model, input_ids, mask, cache, samples[0].max_new_tokens, ctx.eos, stop,
                                      opts.compile, opts.prefill_chunk)
            predictions = [_cut_at_stop(tok.decode(t, skip_special_tokens=True), task.spec.stop) for t in gen.tokens]
        return self.records(ctx, task, samples, encoded, predictions, gen, method, size, budget, memory.read())

    def records(self, ctx: Context, task: Task, samples: list[Sample], encoded: list[list[int]],
                predictions: list[str], gen: Generation, method: str, size: int | float | None, budget: int | None,
                peak: int | None, **shared: Any) -> list[SampleRecord]:
        """One batch's records; `shared` holds the query-agnostic fields (context_id, context_prefill_s)."""
        per_layer = [layer_vector(layer) for layer in gen.stats.get("layers", [])]
        evicted, quantized = evicted_quantized(per_layer)
        rows = len(samples)
        records = []
        for i, (sample, ids, prediction) in enumerate(zip(samples, encoded, predictions)):
            steps, decode_s = row_decode(gen.itl_s, gen.generated[i] if gen.generated else 0)
            records.append(SampleRecord(
                suite=self.name, task=task.name, sample_id=sample.sample_id, quant_type=method, cache_size=size,
                window_size=ctx.opts.window_size, budget=budget, prompt_tokens=len(ids), prediction=prediction,
                references=sample.references, score=self.score(task.spec, sample, prediction),
                prefill_s=gen.prefill_s, ttft_ms=gen.ttft_s * 1000,
                itl_ms=[t * 1000 for t in gen.itl_s] if i == 0 else [], decode_tokens=len(gen.tokens[i]),
                decode_steps=steps, decode_s=decode_s, batch_id=samples[0].sample_id, batch_rows=rows, batch_row=i,
                kv_bytes=gen.kv_bytes / rows, kv_bytes_full=gen.kv_bytes_full / rows, host_bytes=gen.host_bytes / rows,
                compressed=bool(gen.stats.get("compressed")), evicted_frac=evicted, quantized_frac=quantized,
                peak_mem_bytes=peak, weights_bytes=ctx.info.get("weights_bytes"), layers=per_layer,
                extra={k: v for k, v in sample.extra.items() if k != "all_classes"}, protocol=ctx.protocol,
                shared_prefill_s=gen.shared_prefill_s or None,
                **shared))
        return records

    def run_after_context(self, ctx: Context, task: Task, sample: Sample, method: str, size: int | float | None
                          ) -> list[SampleRecord]:
        """Query-agnostic, one prompt: its context compressed alone (or the same context's cache, compressed
        for the previous prompt, copied), then its question through that cache."""
        opts, ids, n = ctx.opts, sample.ids or [], sample.context_tokens or 0
        budget = budget_for(size, len(ids), method, opts.window_size, opts.method_options)
        key = (method, size, budget, json.dumps(opts.method_options, sort_keys=True, default=str), tuple(ids[:n]))
        memory = PeakMemory(model_devices(ctx.model))
        context_s = 0.0
        if key not in ctx.contexts:
            ctx.contexts.clear()  # one compressed context is kept: prompts that share one come one after another
            cache = make_cache(method, ctx.model.config, attention_kernel=opts.attention_kernel,
                               **cache_options(method, budget, opts.window_size, opts.method_options))
            mask, context_s = compress_context(ctx.model, ids[:n], cache, reserve=len(ids) - n + sample.max_new_tokens)
            ctx.contexts[key] = (cache, mask)
        compressed, mask = ctx.contexts[key]
        cache = copy.deepcopy(compressed)
        if sample.choices:
            answer, gen = choose(ctx, ids, len(ids) - n, sample.choices, cache, mask)
            prediction = answer
        else:
            gen = generate_after_context(ctx.model, ids[n:], mask, cache, sample.max_new_tokens, ctx.eos,
                                         _stopper(ctx.tokenizer, task.spec.stop))
            prediction = _cut_at_stop(ctx.tokenizer.decode(gen.tokens[0], skip_special_tokens=True), task.spec.stop)
        gen.prefill_s += context_s
        gen.ttft_s += context_s
        return self.records(ctx, task, [sample], [ids], [prediction], gen, method, size, budget, memory.read(),
                            context_tokens=n, context_prefill_s=context_s)


def check_lengths(ctx: Context, tasks: list[Task]) -> None:
    """Every prompt and its answer fit the model's positions; UsageError otherwise."""
    limit = ctx.info.get("max_positions")
    for task in tasks:
        for sample in task.samples:
            n, new = len(sample.ids or []), sample.max_new_tokens
            if limit and n + new > limit:
                raise UsageError(f"{task.name}: a prompt of {n} tokens plus {new} new tokens is beyond "
                                 f"{ctx.info['model']}'s {limit} positions: ask for shorter prompts (at most "
                                 f"{limit - new} tokens)")


class RowSuite(PromptSuite):
    """Prompts that come from the task's rows alone (no tokenizer needed), so they are read and checked before
    the model loads."""

    @abstractmethod
    def samples(self, spec: TaskSpec, opts: RunOptions) -> list[Sample]:
        """The task's prompts (its rows read once per process)."""

    def load(self, spec: TaskSpec, opts: RunOptions) -> None:
        self.samples(spec, opts)

    def build(self, spec: TaskSpec, ctx: Context, chat: bool) -> list[Sample]:
        return self.samples(spec, ctx.opts)


def wants_chat(opts: RunOptions, spec: TaskSpec, tokenizer: Any) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if opts.chat_template == "on" and not has:
        raise UsageError("--chat-template on, but the model's tokenizer has no chat template")
    return has and (opts.chat_template == "on" or (opts.chat_template == "auto" and spec.chat_template))


def encode(tokenizer: Any, text: str, chat: bool) -> list[int]:
    if chat:
        out = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)
        return list(out["input_ids"])
    return tokenizer(text).input_ids


def _record(ctx: Context, task: Task, samples: list[Sample], input_ids: torch.Tensor, mask: torch.Tensor) -> Any:
    """The batch's prompt, run through the model once for every configuration of the sweep that can start
    from it (the runner orders the work batch by batch); only the last batch's is kept."""
    key = (task.name, tuple(s.sample_id for s in samples))
    if key not in ctx.records:
        ctx.records.clear()
        opts = ctx.opts
        ctx.records[key] = record_prompt(ctx.model, input_ids, mask, tail=opts.window_size,
                                         prefill_chunk=opts.prefill_chunk,
                                         accumulate=needs_accumulated(m for m in opts.quant_types if shares_prefill(m)))
    return ctx.records[key]


def _stopper(tokenizer: Any, stops: tuple[str, ...]) -> Callable[[list[int]], bool] | None:
    if not stops:
        return None
    return lambda ids: any(s in tokenizer.decode(ids[-32:], skip_special_tokens=False) for s in stops)


def _cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    for stop in stops:
        if stop in text:
            text = text[:text.index(stop)]
    return text


def choose(ctx: Context, ids: list[int], n_tail: int, choices: list[str], cache: Any,
           mask: torch.Tensor | None = None) -> tuple[str, Generation]:
    """Log-likelihood choice: prefill all but the tail through the cache, feed the tail, compare choices.
    With `mask` the cache already holds the head (a query-agnostic context): only the tail is fed."""
    device = ctx.model.device
    head, tail = ids[:-n_tail], ids[-n_tail:]
    t0 = clock(device)
    if mask is None:
        input_ids, mask = left_pad([head], 0, device)
        prefill(ctx.model, input_ids, mask, cache)
    logits, _ = extend(ctx.model, torch.tensor([tail], device=device), mask, cache)
    elapsed = clock(device) - t0
    first = [ctx.tokenizer(c, add_special_tokens=False).input_ids[0] for c in choices]
    best = int(logits[0, -1, first].argmax())
    return choices[best].strip(), Generation(tokens=[[]], prefill_s=elapsed, ttft_s=elapsed, kv_bytes=cache.kv_bytes(),
                                             kv_bytes_full=cache.full_kv_bytes(), host_bytes=cache.host_bytes(),
                                             stats=cache.stats())
