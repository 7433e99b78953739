"""A run: one model x one suite's tasks x methods x cache sizes, to a resumable results folder.

Everything the user asked for is checked before anything is written. Each finished sample
is appended to samples.jsonl at once; summary.csv and layer_stats.csv are rebuilt from it
after every configuration, so a killed run loses at most the sample in flight and a rerun
of the same command carries on where it stopped.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from arkv_bench.cache import METHODS, make_cache, prepare_model
from arkv_bench.generation import Generation, clock, extend, greedy_generate, left_pad, prefill
from arkv_bench.results import SampleLog, evicted_quantized, layer_vector, provenance, write_summaries
from arkv_bench.suites import SUITES, Sample, SuiteOptions, build_samples, score
from arkv_bench.suites.longbench import truncate_middle
from arkv_bench.tasks import TaskSpec, load_task_specs

CHAT_CHOICES = ("auto", "on", "off")
WARMUP_TOKENS = 64
# With a chat template the prompt ends "Answer:" + the template's closing tokens; the last few tokens
# go through the compressed cache after prefill, as the tail does without a template.
CHAT_TAIL_TOKENS = 8


class UsageError(ValueError):
    """Bad input from the user: the message names the problem and the fix."""


@dataclass
class RunOptions:
    """Everything that defines a run (and so its results folder)."""

    suite: str = "passkey"
    tasks: list[str] | None = None
    quant_types: list[str] = field(default_factory=lambda: ["full", "mix"])
    cache_sizes: list[int | float] = field(default_factory=lambda: [1024])
    window_size: int = 32
    method_options: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    limit: int | None = None
    batch_size: int = 1
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    chat_template: str = "auto"
    trust_remote_code: bool = False
    data_dir: str | None = None
    num_fewshot: int | None = None
    context_lengths: list[int] | None = None
    depths: list[float] | None = None
    samples_per_cell: int | None = None
    max_length: int | None = None

    def key(self) -> dict[str, Any]:
        """The options that decide the results (and so must match to resume)."""
        return asdict(self)

    def default_run_name(self) -> str:
        model = re.sub(r"[^A-Za-z0-9_.-]+", "_", (self.model or "smollm2-135m").rstrip("/").split("/")[-1])
        digest = hashlib.sha1(json.dumps(self.key(), sort_keys=True, default=str).encode()).hexdigest()[:8]
        return f"{self.suite}-{model}-{digest}"


# --- validation ---------------------------------------------------------------------------------

def parse_cache_size(text: str) -> int | float:
    """'1024' -> 1024 tokens; '0.2' -> a fifth of each prompt."""
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"cache size {text!r} is not a number: use token counts like 512 or fractions like 0.2")
    if value.is_integer() and value > 1:
        return int(value)
    if 0 < value <= 1:
        return value
    raise UsageError(f"cache size {text!r} must be a token count > 1 or a fraction in (0, 1]")


LM_EVAL = "lm-eval"  # lm-evaluation-harness tasks: arkv_bench/suites/lm_eval_suite.py


def task_specs(suite: str) -> dict[str, TaskSpec]:
    if suite not in SUITES or suite == "longbench_e":
        raise UsageError(f"unknown suite {suite!r}; valid suites: passkey, gsm8k, mmlu, longbench, {LM_EVAL}")
    specs = load_task_specs(suite)
    return {**specs, **load_task_specs("longbench_e")} if suite == "longbench" else specs


def select_tasks(suite: str, wanted: list[str] | None) -> list[TaskSpec]:
    """Tasks by name or glob (`*_e`); by default every task of the suite (LongBench: the 21 v1 ones)."""
    specs = task_specs(suite)
    if not wanted:
        return [s for s in specs.values() if not (suite == "longbench" and s.name.endswith("_e"))]
    chosen: list[TaskSpec] = []
    for pattern in wanted:
        hits = [s for name, s in specs.items() if fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            raise UsageError(f"unknown task {pattern!r} for suite {suite}; valid: {', '.join(specs)}")
        chosen += [h for h in hits if h not in chosen]
    return chosen


def validate(opts: RunOptions) -> list[TaskSpec]:
    """Every check that needs no model; raises UsageError."""
    if opts.suite == LM_EVAL:  # lm-eval builds its own requests: no TaskSpecs, the names are checked by lm-eval
        from arkv_bench.suites.lm_eval_suite import LmEvalError, check_tasks

        try:
            check_tasks(opts.tasks, opts.data_dir)
        except LmEvalError as e:
            raise UsageError(str(e)) from e
        tasks: list[TaskSpec] = []
    else:
        tasks = select_tasks(opts.suite, opts.tasks)
    for name in opts.quant_types:
        if name not in METHODS:
            raise UsageError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    if opts.window_size < 1:
        raise UsageError(f"--window-size must be a positive integer, got {opts.window_size}")
    for size in opts.cache_sizes:
        if isinstance(size, int) and size <= opts.window_size and any(METHODS[m].budgeted for m in opts.quant_types):
            raise UsageError(f"cache size {size} must be larger than the window size {opts.window_size}")
    for name, value in (("--limit", opts.limit), ("--batch-size", opts.batch_size), ("--num-fewshot", opts.num_fewshot),
                        ("--samples-per-cell", opts.samples_per_cell), ("--max-length", opts.max_length)):
        least = 1 if name in ("--batch-size", "--samples-per-cell") else 0
        if value is not None and value < least:
            raise UsageError(f"{name} must be {'at least 1' if least else 'zero or more'}, got {value}")
    if opts.chat_template not in CHAT_CHOICES:
        raise UsageError(f"--chat-template must be one of {', '.join(CHAT_CHOICES)}")
    for depth in opts.depths or []:
        if not 0 <= depth <= 1:
            raise UsageError(f"depth {depth} must be in [0, 1]")
    if opts.data_dir is not None and not Path(opts.data_dir).is_dir():
        raise UsageError(f"--data-dir {opts.data_dir} is not a folder")
    sizes = [k for k in opts.method_options if k in ("cache_size", "window_size")]
    if sizes:
        raise UsageError(f"{sizes[0]} is not a method option: use --{sizes[0].replace('_', '-')}")
    unknown = [k for k in opts.method_options if not any(k in METHODS[m].defaults for m in opts.quant_types)]
    if unknown:
        raise UsageError(f"no selected method has option {', '.join(unknown)}; see `arkv-bench list` for each method's options")
    check_caches(opts, _FakeConfig())
    return tasks


def check_caches(opts: RunOptions, model_config: Any, prefix: str = "") -> None:
    """Build each (method, cache size) once, so impossible options fail before anything is written."""
    for method, size in configurations(opts):
        # a fraction's budget is at least window + 1 (budget_for): check that smallest case
        budget = None if size is None else size if isinstance(size, int) else opts.window_size + 1
        try:
            make_cache(method, model_config, **cache_options(opts, method, budget))
        except ValueError as e:
            raise UsageError(f"{prefix}{e}") from e


class _FakeConfig:
    """Just enough of a model config to validate options before a model is loaded."""

    num_hidden_layers = 1

    def get_text_config(self) -> "_FakeConfig":
        return self


def cache_options(opts: RunOptions, method: str, budget: int | None) -> dict[str, Any]:
    """make_cache options of one method: its budget, the window, and the method options it declares."""
    cls = METHODS[method]
    mine = {k: v for k, v in opts.method_options.items() if k in cls.defaults}
    sized = {"cache_size": budget} if cls.budgeted else {}
    return {**mine, **sized, "window_size": opts.window_size}


def budget_for(size: int | float, prompt_tokens: int, window: int) -> int:
    """A fraction of the prompt (at least window + 1 tokens), or the token count itself."""
    return size if isinstance(size, int) else max(round(size * prompt_tokens), window + 1)


def configurations(opts: RunOptions) -> Iterator[tuple[str, int | float | None]]:
    """(method, cache size): methods without a budget run once."""
    for method in opts.quant_types:
        if METHODS[method].budgeted:
            for size in opts.cache_sizes:
                yield method, size
        else:
            yield method, None


# --- prompts -------------------------------------------------------------------------------------

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


# --- one batch -----------------------------------------------------------------------------------

@dataclass
class Context:
    model: Any
    tokenizer: Any
    opts: RunOptions
    info: dict[str, Any]
    eos: list[int]


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


def run_batch(ctx: Context, spec: TaskSpec, batch: list[Sample], method: str, size: int | float | None,
              chat: bool) -> list[dict[str, Any]]:
    """Run a batch of samples with one method; return their records."""
    tok, opts = ctx.tokenizer, ctx.opts
    encoded = [encode(tok, s.prompt + s.tail, chat) for s in batch]
    budget = None if size is None else budget_for(size, len(encoded[0]), opts.window_size)
    cache = make_cache(method, ctx.model.config, **cache_options(opts, method, budget))
    device = ctx.model.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if batch[0].choices:
        n_tail = len(tok(batch[0].tail, add_special_tokens=False).input_ids) if not chat else CHAT_TAIL_TOKENS
        answer, gen = choose(ctx, encoded[0], n_tail, batch[0].choices, cache)
        predictions = [answer]
    else:
        input_ids, mask = left_pad(encoded, tok.pad_token_id or 0, device)
        gen = greedy_generate(ctx.model, input_ids, mask, cache, batch[0].max_new_tokens, ctx.eos,
                              _stopper(tok, spec.stop))
        predictions = [_cut_at_stop(tok.decode(t, skip_special_tokens=True), spec.stop) for t in gen.tokens]
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    layers = gen.stats.get("layers", [])
    return [{**_record(spec, s, method, size, budget, ids, pred, gen, i, len(batch), peak, layers),
             "window_size": opts.window_size} for i, (s, ids, pred) in enumerate(zip(batch, encoded, predictions))]


def _record(spec: TaskSpec, sample: Sample, method: str, size: int | float | None, budget: int | None,
            ids: list[int], prediction: str, gen: Generation, row: int, rows: int, peak: int | None,
            layers: list[dict[str, Any]]) -> dict[str, Any]:
    per_layer = [layer_vector(layer) for layer in layers]
    evicted, quantized = evicted_quantized(per_layer)
    return {"suite": spec.suite, "task": spec.name, "sample_id": sample.sample_id, "quant_type": method,
            "cache_size": size, "budget": budget, "status": "ok", "prompt_tokens": len(ids),
            "prediction": prediction, "references": sample.references, "score": score(spec, sample, prediction),
            "prefill_s": gen.prefill_s, "ttft_ms": gen.ttft_s * 1000, "itl_ms": [t * 1000 for t in gen.itl_s],
            "decode_tokens": len(gen.tokens[row]), "batch_rows": rows, "batch_row": row,
            "kv_bytes": gen.kv_bytes / rows, "kv_bytes_full": gen.kv_bytes_full / rows,
            "host_bytes": gen.host_bytes / rows,
            "compressed": bool(gen.stats.get("compressed")), "evicted_frac": evicted, "quantized_frac": quantized,
            "peak_mem_bytes": peak, "layers": per_layer, "extra": {k: v for k, v in sample.extra.items()
                                                                     if k != "all_classes"}}


def oom_record(spec: TaskSpec, sample: Sample, method: str, size: int | float | None,
               window: int | None = None) -> dict[str, Any]:
    return {"suite": spec.suite, "task": spec.name, "sample_id": sample.sample_id, "quant_type": method,
            "cache_size": size, "window_size": window, "status": "oom", "references": sample.references, "extra": {}}


def warm_up(ctx: Context, method: str) -> None:
    """One short untimed generation, so the first timed sample does not pay for kernel selection."""
    if ctx.model.device.type != "cuda":
        return
    ids = torch.randint(10, 1000, (1, WARMUP_TOKENS), device=ctx.model.device)
    budget = WARMUP_TOKENS // 2 if METHODS[method].budgeted else None
    opts = cache_options(ctx.opts, method, max(budget or 0, ctx.opts.window_size + 1) if budget else None)
    greedy_generate(ctx.model, ids, torch.ones_like(ids), make_cache(method, ctx.model.config, **opts), 4)


# --- the run -------------------------------------------------------------------------------------

def prepare_samples(ctx: Context, spec: TaskSpec) -> tuple[list[Sample], bool]:
    opts = ctx.opts
    chat = wants_chat(opts, spec, ctx.tokenizer)
    suite_opts = SuiteOptions(data_dir=Path(opts.data_dir) if opts.data_dir else None, limit=opts.limit,
                              num_fewshot=opts.num_fewshot, context_lengths=opts.context_lengths,
                              depths=opts.depths, samples_per_cell=opts.samples_per_cell, seed=opts.seed)
    samples = build_samples(spec, suite_opts, ctx.tokenizer, chat)
    if spec.suite.startswith("longbench"):
        limit = opts.max_length or (ctx.info.get("max_positions") or 8192) - spec.max_new_tokens - 64
        for s in samples:
            s.prompt = truncate_middle(ctx.tokenizer, s.prompt, limit)
    return samples, chat


def batches(samples: list[Sample], size: int) -> Iterator[list[Sample]]:
    for i in range(0, len(samples), size):
        yield samples[i:i + size]


def check_run_folder(opts: RunOptions, out: Path, run_name: str | None) -> Path:
    """The run folder; raises UsageError (writing nothing) if it holds another run's results."""
    folder = out / (run_name or opts.default_run_name())
    config_path = folder / "config.json"
    if config_path.exists():
        try:
            previous = json.loads(config_path.read_text())
        except (OSError, ValueError):
            previous = {}
        if not isinstance(previous, dict) or previous.get("options") != json.loads(json.dumps(opts.key(), default=str)):
            raise UsageError(f"{folder} holds a different run's results: choose another --run-name or remove it")
    elif folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} is a file, not a results folder: choose another --out or --run-name")
    return folder


def check_model(ctx: Context) -> None:
    """Every selected method can build its cache for this model (checked before anything is written)."""
    check_caches(ctx.opts, ctx.model.config, prefix=f"{ctx.info['model']}: ")


def open_run(opts: RunOptions, out: Path, run_name: str | None, info: dict[str, Any], chats: dict[str, bool]
             ) -> tuple[Path, SampleLog]:
    """Create or reopen the run folder; a folder of another run under the same name is an error."""
    folder = check_run_folder(opts, out, run_name)
    config_path = folder / "config.json"
    key = opts.key()
    # the documented keys (docs/results-format.md) on top; "options" is what a resume must match
    config = {"run_name": folder.name, "suite": opts.suite, "tasks": list(chats), "quant_types": opts.quant_types,
              "cache_sizes": opts.cache_sizes, "window_size": opts.window_size,
              "method_options": opts.method_options, "model": info["model"], "limit": opts.limit,
              "batch_size": opts.batch_size, "seed": opts.seed, "device": info["device"], "dtype": info["dtype"],
              "attn_implementation": "arkv (SDPA inside)",
              "chat_template": all(chats.values()) if len(set(chats.values())) <= 1 else chats,
              "options": key, "provenance": provenance(info)}
    folder.mkdir(parents=True, exist_ok=True)
    tmp = config_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(config, indent=2, default=str))
    tmp.replace(config_path)
    return folder, SampleLog(folder / "samples.jsonl")


def plan(ctx: Context, tasks: list[TaskSpec]) -> list[tuple[TaskSpec, list[Sample], bool]]:
    return [(spec, *prepare_samples(ctx, spec)) for spec in tasks]


def execute(ctx: Context, work: list[tuple[TaskSpec, list[Sample], bool]], folder: Path, log: SampleLog,
            progress: Callable[[str, int], None] | None = None) -> None:
    """Run every (task, method, cache size) not already in the log."""
    opts = ctx.opts
    if opts.suite == LM_EVAL:
        from arkv_bench.suites.lm_eval_suite import LmEvalError, execute as execute_lm_eval

        try:
            execute_lm_eval(ctx, folder, log, progress)
        except LmEvalError as e:  # e.g. a Hub dataset with no network: one clear line, not a traceback
            raise UsageError(str(e)) from e
        return
    prepare_model(ctx.model)
    warmed: set[str] = set()
    for spec, samples, chat in work:
        for method, size in configurations(opts):
            todo = [s for s in samples if not log.has(spec.name, s.sample_id, method, size)]
            if not todo:
                continue
            if method not in warmed:
                warm_up(ctx, method)
                warmed.add(method)
            step = 1 if (isinstance(size, float) or todo[0].choices) else opts.batch_size
            label = f"{method}@{size if size is not None else '-'} {spec.name}"
            for batch in batches(todo, step):
                try:
                    records = run_batch(ctx, spec, batch, method, size, chat)
                except (torch.OutOfMemoryError, MemoryError):
                    torch.cuda.empty_cache() if torch.cuda.is_available() else None
                    for s in todo[todo.index(batch[0]):]:
                        log.append(oom_record(spec, s, method, size, opts.window_size))
                    break
                for record in records:
                    log.append(record)
                if progress:
                    progress(label, len(batch))
            write_summaries(folder, ctx.info)
