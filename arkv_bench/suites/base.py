"""What a suite is: the protocol every suite implements, and the base of the prompt suites.

A suite is one file under arkv_bench/suites/ that defines `SUITE`, an instance of a `Suite`
subclass; the registry (arkv_bench/suites/__init__.py) finds it by that name. The runner and
`tune` drive every suite the same way:

    suite.check(opts)                         before the model loads: names and options (UsageError)
    tasks = suite.plan(ctx)                   the prompts (their data read: DataError)
    suite.batches(ctx, task, method, size, records)  the work not yet among the configuration's records
    suite.run(ctx, task, batch, method, size) -> [SampleRecord]

`PromptSuite` is the base of the suites declared in tasks/<suite>.yaml: a subclass says how a
task's rows become prompts (`build`) and, where the metric is not a named one, how to score.
"""

from __future__ import annotations

import fnmatch
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from arkv_bench.budgets import budget_for, cache_options
from arkv_bench.cache import make_cache
from arkv_bench.generation import Generation, clock, extend, greedy_generate, left_pad, prefill
from arkv_bench.measures import PeakMemory, row_decode
from arkv_bench.models import model_devices
from arkv_bench.metrics import gsm8k_score, longbench_sample_score, passkey_score
from arkv_bench.options import RunOptions, UsageError
from arkv_bench.results import SampleRecord, evicted_quantized, layer_vector
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


@dataclass
class Context:
    """A loaded model and the run's options: what a suite runs with."""

    model: Any
    tokenizer: Any
    opts: RunOptions
    info: dict[str, Any]
    eos: list[int]


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
                             references=s.references) for s in batch.samples]


def limited(rows: list[Any], limit: int | None) -> list[Any]:
    return rows if limit is None else rows[:limit]


# --- suites of prompts declared in tasks/<suite>.yaml ------------------------------------------------

class PromptSuite(Suite):
    """Prompts built from a task's rows, answered by generation or by log-likelihood of choices."""

    extra_files: ClassVar[tuple[str, ...]] = ()  # more tasks/*.yaml files whose tasks belong to this suite

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
            tasks.append(Task(name=spec.name, chat=chat, samples=samples, spec=spec))
        check_lengths(ctx, tasks)
        return tasks

    def batches(self, ctx: Context, task: Task, method: str, size: int | float | None,
                records: list[dict[str, Any]]) -> list[Batch]:
        done = {str(r.get("sample_id")) for r in records if r.get("task") == task.name}
        todo = [s for s in task.samples if s.sample_id not in done]
        # a fraction gives each prompt its own budget, and a choice is scored one prompt at a time
        step = 1 if (isinstance(size, float) or (todo and todo[0].choices)) else ctx.opts.batch_size
        return [Batch(samples=todo[i:i + step], units=len(todo[i:i + step])) for i in range(0, len(todo), step)]

    def run(self, ctx: Context, task: Task, batch: Batch, method: str, size: int | float | None
            ) -> list[SampleRecord]:
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
            gen = greedy_generate(ctx.model, input_ids, mask, cache, samples[0].max_new_tokens, ctx.eos,
                                  _stopper(tok, task.spec.stop))
            predictions = [_cut_at_stop(tok.decode(t, skip_special_tokens=True), task.spec.stop) for t in gen.tokens]
        peak = memory.read()
        per_layer = [layer_vector(layer) for layer in gen.stats.get("layers", [])]
        evicted, quantized = evicted_quantized(per_layer)
        rows = len(samples)
        records = []
        for i, (sample, ids, prediction) in enumerate(zip(samples, encoded, predictions)):
            steps, decode_s = row_decode(gen.itl_s, gen.generated[i] if gen.generated else 0)
            records.append(SampleRecord(
                suite=self.name, task=task.name, sample_id=sample.sample_id, quant_type=method, cache_size=size,
                window_size=opts.window_size, budget=budget, prompt_tokens=len(ids), prediction=prediction,
                references=sample.references, score=self.score(task.spec, sample, prediction),
                prefill_s=gen.prefill_s, ttft_ms=gen.ttft_s * 1000,
                itl_ms=[t * 1000 for t in gen.itl_s] if i == 0 else [], decode_tokens=len(gen.tokens[i]),
                decode_steps=steps, decode_s=decode_s, batch_id=samples[0].sample_id, batch_rows=rows, batch_row=i,
                kv_bytes=gen.kv_bytes / rows, kv_bytes_full=gen.kv_bytes_full / rows, host_bytes=gen.host_bytes / rows,
                compressed=bool(gen.stats.get("compressed")), evicted_frac=evicted, quantized_frac=quantized,
                peak_mem_bytes=peak, weights_bytes=ctx.info.get("weights_bytes"), layers=per_layer,
                extra={k: v for k, v in sample.extra.items() if k != "all_classes"}))
        return records


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


def _stopper(tokenizer: Any, stops: tuple[str, ...]) -> Callable[[list[int]], bool] | None:
    if not stops:
        return None
    return lambda ids: any(s in tokenizer.decode(ids[-32:], skip_special_tokens=False) for s in stops)


def _cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    for stop in stops:
        if stop in text:
            text = text[:text.index(stop)]
    return text


def choose(ctx: Context, ids: list[int], n_tail: int, choices: list[str], cache: Any) -> tuple[str, Generation]:
    """Log-likelihood choice: prefill all but the tail through the cache, feed the tail, compare choices."""
    device = ctx.model.device
    head, tail = ids[:-n_tail], ids[-n_tail:]
    input_ids, mask = left_pad([head], 0, device)
    t0 = clock(device)
    prefill(ctx.model, input_ids, mask, cache)
    logits, _ = extend(ctx.model, torch.tensor([tail], device=device), mask, cache)
    elapsed = clock(device) - t0
    first = [ctx.tokenizer(c, add_special_tokens=False).input_ids[0] for c in choices]
    best = int(logits[0, -1, first].argmax())
    return choices[best].strip(), Generation(tokens=[[]], prefill_s=elapsed, ttft_s=elapsed, kv_bytes=cache.kv_bytes(),
                                             kv_bytes_full=cache.full_kv_bytes(), host_bytes=cache.host_bytes(),
                                             stats=cache.stats())
