"""A run: one model x one suite's tasks x methods x cache sizes, to a resumable results folder.

Everything the user asked for is checked before anything is written. Each finished sample
is appended to samples.jsonl at once; summary.csv and layer_stats.csv are rebuilt from it
after every configuration, so a killed run loses at most the batch in flight and a rerun
of the same command carries on where it stopped. Every suite runs through the same loop
(arkv_bench.suites.base.Suite), with the same warm-up before each configuration (on a CPU, once).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

from arkv_bench import budgets
from arkv_bench.cache import METHODS, make_cache, prepare_model
from arkv_bench.distributed import Ranks, barrier, init
from arkv_bench.generation import Generation, greedy_generate
from arkv_bench.measures import eos_ids, weights_bytes
from arkv_bench.options import RunOptions, UsageError
from arkv_bench.protocols import QUERY_AWARE
from arkv_bench.results import SampleLog, provenance, write_summaries
from arkv_bench.results_io import atomic_write, check_writable_folder, record_key, sample_files
from arkv_bench.suites import Batch, Context, Suite, Task, get_suite

__all__ = ["Context", "RunOptions", "UsageError", "execute", "load_context", "open_run", "validate", "warm_up"]

WARMUP_TOKENS = 64  # prompt tokens beyond the budget, so the warm-up compresses as the real samples do
WARMUP_NEW_TOKENS = 4
LOCK_FILE = ".arkv-bench.lock"  # held by the one process writing a run folder
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


# --- validation ---------------------------------------------------------------------------------

def configurations(opts: RunOptions) -> Iterator[tuple[str, int | float | None]]:
    """(method, cache size): methods without a budget run once."""
    return budgets.configurations(opts.quant_types, opts.cache_sizes)


def validate(opts: RunOptions) -> Suite:
    """Every check that needs no model; the run's suite, or UsageError."""
    suite = get_suite(opts.suite)
    for name in opts.quant_types:
        if name not in METHODS:
            raise UsageError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    for size in opts.cache_sizes:
        if isinstance(size, int) and size <= opts.window_size and any(METHODS[m].budgeted for m in opts.quant_types):
            raise UsageError(f"cache size {size} must be larger than the window size {opts.window_size}")
    sizes = [k for k in opts.method_options if k in ("cache_size", "window_size")]
    if sizes:
        raise UsageError(f"{sizes[0]} is not a method option: use --{sizes[0].replace('_', '-')}")
    unknown = [k for k in opts.method_options if not any(k in METHODS[m].defaults for m in opts.quant_types)]
    if unknown:
        raise UsageError(f"no selected method has option {', '.join(unknown)}; see `arkv-bench list` for each method's options")
    if opts.device_map is not None and Ranks.from_env().world > 1:
        raise UsageError("--device-map auto spreads one model over all GPUs; it cannot be combined with several "
                         "data-parallel ranks (--gpus / torchrun): use one or the other")
    if opts.protocols != ["query-aware"] and not suite.query_agnostic:
        raise UsageError(f"--suite {suite.name} has no question to hold back from the compressed context, so "
                         f"--protocol {','.join(opts.protocols)} does not apply: use --protocol query-aware")
    check_caches(opts)
    suite.check(opts)  # last: it may read the data
    return suite


def check_caches(opts: RunOptions, model_config: Any = None, prefix: str = "") -> None:
    """Build each (method, cache size) once, so impossible options fail before anything is written.
    A fraction is checked with the smallest budget it can get (budgets.budget_for)."""
    for method, size in configurations(opts):
        budget = size if not isinstance(size, float) else \
            budgets.smallest_budget(method, opts.window_size, opts.method_options)
        try:
            budgets.check_cache(method, budget, opts.window_size, opts.method_options, model_config)
        except ValueError as e:
            raise UsageError(f"{prefix}{e}") from e


# --- the model -----------------------------------------------------------------------------------

def budget_notes(opts: RunOptions, tasks: list[Task]) -> list[str]:
    """A fraction is a share of each prompt, but at least the smallest budget its method accepts: say where that
    raises it. A fraction that rounds to no token at all on the shortest prompt is an error (UsageError)."""
    lengths = [len(s.ids) for t in tasks for s in t.samples if s.ids]
    notes = []
    for method, size in configurations(opts):
        if not (isinstance(size, float) and lengths):
            continue
        shortest, floor = min(lengths), budgets.smallest_budget(method, opts.window_size, opts.method_options)
        if round(size * shortest) < 1:
            raise UsageError(f"cache size {size:g} of the shortest prompt ({shortest} tokens) is no token at all: "
                             f"use a larger fraction or a token count")
        raised = sum(round(size * n) < floor for n in lengths)
        if raised:
            notes.append(f"cache size {size:g} with {method}: {raised} of {len(lengths)} prompts get the smallest "
                         f"budget {method} accepts ({floor} tokens) instead of {size:g} of their length")
    return notes


def load_context(opts: RunOptions, ranks: Ranks = Ranks()) -> Context:
    """Load the run's model (ModelError if it cannot be) with the one EOS rule and its weights' bytes;
    in a data-parallel run, on the rank's own GPU."""
    from arkv_bench.models import load_model

    model, tokenizer, info = load_model(opts.model, ranks.device(opts.device), opts.dtype, opts.trust_remote_code,
                                        attn_implementation="arkv", device_map=opts.device_map)
    info["weights_bytes"] = weights_bytes(model)
    ctx = Context(model=model, tokenizer=tokenizer, opts=opts, info=info, eos=eos_ids(model, tokenizer),
                  protocol=opts.protocols[0])  # `run` sets each protocol in turn; `tune` uses the first
    check_caches(opts, model.config, prefix=f"{info['model']}: ")
    return ctx


def warm_up(ctx: Context, method: str, size: int | float | None) -> Generation:
    """One short untimed generation with the configuration's own cache options, so the first timed
    sample does not pay for kernel selection or lazy allocation (on every device and suite)."""
    opts = ctx.opts
    smallest = budgets.smallest_budget(method, opts.window_size, opts.method_options)
    target = (size if isinstance(size, int) else smallest) + WARMUP_TOKENS if METHODS[method].budgeted \
        else WARMUP_TOKENS
    n = min(target, (ctx.info.get("max_positions") or target + WARMUP_NEW_TOKENS) - WARMUP_NEW_TOKENS)
    budget = budgets.budget_for(size, n, method, opts.window_size, opts.method_options)
    cache = make_cache(method, ctx.model.config, attention_kernel=opts.attention_kernel,
                       **budgets.cache_options(method, budget, opts.window_size, opts.method_options))
    generator = torch.Generator().manual_seed(0)
    vocab = ctx.model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (1, n), generator=generator).to(ctx.model.device)
    return greedy_generate(ctx.model, ids, torch.ones_like(ids), cache, WARMUP_NEW_TOKENS, compile=opts.compile,
                           prefill_chunk=opts.prefill_chunk)


# --- the run folder ------------------------------------------------------------------------------

def _lock(folder: Path) -> FileLock:
    """The run folder's lock, taken at once or UsageError: one process writes a run folder at a time."""
    lock = FileLock(str(folder / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UsageError(f"another arkv-bench process is writing {folder} now; wait for it to end (the same command "
                         f"then resumes) or choose another --run-name") from None
    return lock


def folder_inside(out: Path, name: str) -> Path:
    """`out`/`name` for a results folder: `name` one safe folder name, `out` a writable folder, the result not a
    file (UsageError otherwise, nothing written)."""
    if not _RUN_NAME.fullmatch(name) or name in (".", ".."):
        raise UsageError(f"--run-name {name!r} must be one folder name (letters, digits, '.', '_', '-', not "
                         f"starting with '.' or '-'); the run folder is always made inside --out")
    check_writable_folder(out, "--out")
    folder = out / name
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} is a file, not a results folder: choose another --out or --run-name")
    return folder


def check_run_folder(opts: RunOptions, out: Path, run_name: str | None, probe_lock: bool = True) -> Path:
    """The run folder; raises UsageError (writing nothing) if it is outside --out, not writable, in use, or
    holds another run's results."""
    folder = folder_inside(out, run_name if run_name is not None else opts.default_run_name())
    config_path = folder / "config.json"
    if config_path.exists():
        try:
            previous = json.loads(config_path.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            raise UsageError(f"{config_path} is not readable JSON (corrupted?): remove {folder} to start over, "
                             f"or choose another --run-name") from None
        if not isinstance(previous, dict) or previous.get("options") != json.loads(json.dumps(opts.key(), default=str)):
            raise UsageError(f"{folder} holds a different run's results: choose another --run-name or remove it")
    if folder.is_dir():
        check_writable_folder(folder, "--run-name")
        log = folder / "samples.jsonl"
        if log.exists() and not os.access(log, os.W_OK):
            raise UsageError(f"{log} is not writable, so this run cannot resume: fix its permissions or choose "
                             f"another --run-name")
        if probe_lock and (folder / LOCK_FILE).exists():
            _lock(folder).release()
    return folder


def open_run(opts: RunOptions, out: Path, run_name: str | None, info: dict[str, Any], chats: dict[str, bool],
             samples_file: str = "samples.jsonl") -> tuple[Path, SampleLog, FileLock]:
    """Create or reopen the run folder under its lock (held until released); a folder of another run under the
    same name, or one another process writes, is an error."""
    folder = check_run_folder(opts, out, run_name)
    # the documented keys (docs/results-format.md) on top; "options" is what a resume must match
    config = {"run_name": folder.name, "suite": opts.suite, "tasks": list(chats), "quant_types": opts.quant_types,
              "cache_sizes": opts.cache_sizes, "protocols": opts.protocols, "window_size": opts.window_size,
              "method_options": opts.method_options, "model": info["model"], "limit": opts.limit,
              "batch_size": opts.batch_size, "seed": opts.seed, "device": info["device"], "dtype": info["dtype"],
              "attn_implementation": "arkv (SDPA inside)", "weights_bytes": info.get("weights_bytes"),
              "chat_template": all(chats.values()) if len(set(chats.values())) <= 1 else chats,
              "options": opts.key(), "provenance": provenance(info)}
    folder.mkdir(parents=True, exist_ok=True)
    lock = _lock(folder)
    try:
        check_run_folder(opts, out, run_name, probe_lock=False)  # again under the lock: another process may have
        # written it meanwhile
        atomic_write(folder / "config.json", json.dumps(config, indent=2, default=str))
        return folder, SampleLog(folder / samples_file), lock
    except BaseException:
        lock.release()
        raise


# --- the loop ------------------------------------------------------------------------------------

def _records_of(log: SampleLog, suite: Suite, method: str, size: int | float | None, protocol: str
                ) -> list[dict[str, Any]]:
    key = "" if size is None else str(size)
    return [r for r in log.records if r.get("suite") == suite.name and record_key(r)[2:] == (method, key, protocol)]


def protocol_contexts(ctx: Context) -> Iterator[Context]:
    """The run's context once per protocol (--protocol), each a separate configuration."""
    for protocol in ctx.opts.protocols:
        yield replace(ctx, protocol=protocol, contexts={})


def progress_counts(ctx: Context, suite: Suite, tasks: list[Task], log: SampleLog) -> tuple[int, int]:
    """(progress steps of the whole run, steps already in the log)."""
    total = pending = 0
    for task in tasks:
        for pctx in protocol_contexts(ctx):
            for method, size in configurations(ctx.opts):
                total += suite.units(task)
                pending += sum(b.units for b in suite.batches(pctx, task, method, size,
                                                              _records_of(log, suite, method, size, pctx.protocol)))
    return total, total - pending


@dataclass
class Run:
    """A run ready to execute: checked, its model loaded, its prompts built, its folder open."""

    ctx: Context
    suite: Suite
    tasks: list[Task]
    folder: Path
    log: SampleLog
    lock: FileLock | None = None
    created: Path | None = None  # the outermost folder this process made for the run
    notes: list[str] = field(default_factory=list)  # what the user should know before the numbers
    ranks: Ranks = field(default_factory=Ranks)

    def close(self, failed: bool) -> None:
        """Release the folder; a run that failed before writing its first record leaves nothing behind."""
        if self.lock is not None:
            self.lock.release()
        if failed and self.created is not None and not self.log.written:
            shutil.rmtree(self.created, ignore_errors=True)


def prepare(opts: RunOptions, out: Path, run_name: str | None, ranks: Ranks | None = None) -> Run:
    """Check everything, load the model, build the prompts, then (only then) open the run folder.

    In a data-parallel run rank 0 owns the folder (its lock, config.json); every rank appends to its
    own sample log, and counts every rank's records as done (so a resume, with any number of ranks,
    neither repeats nor loses a sample)."""
    ranks = ranks or Ranks.from_env()
    init(ranks)
    suite = validate(opts)
    folder = check_run_folder(opts, out, run_name, probe_lock=ranks.main)  # before the model loads
    ctx = load_context(opts, ranks)
    tasks = suite.plan(ctx)
    notes = budget_notes(ctx.opts, tasks)
    created = None
    for path in (folder, *folder.parents):
        if path.exists():
            break
        created = path
    lock = None
    if ranks.main:
        folder, log, lock = open_run(opts, out, run_name, ctx.info, {t.name: t.chat for t in tasks},
                                     ranks.samples_file())
    barrier(ranks)  # the folder exists and is rank 0's
    if not ranks.main:
        log = SampleLog(folder / ranks.samples_file())
    barrier(ranks)  # every rank's own log is repaired: now each may read the others'
    log.include(sample_files(folder))
    return Run(ctx=ctx, suite=suite, tasks=tasks, folder=folder, log=log, lock=lock,
               created=created if ranks.main else None, notes=[n for n in (log.note, *notes) if n], ranks=ranks)


WorkItem = tuple[Context, Task, str, "int | float | None", Batch]


def work_items(run: Run) -> list[WorkItem]:
    """Every (protocol's context, task, method, cache size, batch) not yet in the logs, in one fixed order
    (the same on every rank)."""
    items = []
    for task in run.tasks:
        for pctx, (method, size) in itertools.product(protocol_contexts(run.ctx), configurations(run.ctx.opts)):
            records = _records_of(run.log, run.suite, method, size, pctx.protocol)
            items += [(pctx, task, method, size, batch) for batch in run.suite.batches(pctx, task, method, size, records)]
    if run.ctx.opts.shared_prefill:  # query-aware batch by batch, so that one recorded prompt serves every configuration
        task_at = {id(task): i for i, task in enumerate(run.tasks)}
        sample_at = {id(s): i for task in run.tasks for i, s in enumerate(task.samples)}
        config_at = {c: i for i, c in enumerate(configurations(run.ctx.opts))}

        def order(item: WorkItem) -> tuple[bool, int, int, int]:
            pctx, task, method, size, batch = item
            first, config = sample_at.get(id(batch.samples[0]), 0) if batch.samples else 0, config_at[(method, size)]
            aware = pctx.protocol == QUERY_AWARE
            return not aware, task_at[id(task)], *((first, config) if aware else (config, first))

        items.sort(key=order)
    return items


def _prompt(item: WorkItem) -> tuple:
    """The prompt a work item runs: the items of one prompt share its recorded forward pass."""
    pctx, task, _, _, batch = item
    return pctx.protocol, task.name, tuple(s.sample_id for s in batch.samples)


def execute(run: Run, progress: Callable[[str, int], None] | None = None) -> list[dict[str, Any]]:
    """Run every (task, method, cache size) not already in the logs (a data-parallel rank: its share of
    them); return the summary rows (rank 0, once every rank is done; other ranks: none)."""
    ctx, suite, log, ranks = run.ctx, run.suite, run.log, run.ranks
    prepare_model(ctx.model)
    warmed: set[tuple] = set()
    # On a GPU, graphs and compiled steps specialise on each method and store capacity; on a CPU nothing is
    # compiled, and one warm-up (allocator, thread pool, the model's kernels) serves every configuration.
    on_gpu = ctx.model.device.type == "cuda"
    mine = ranks.share(work_items(run), group=_prompt if ctx.opts.shared_prefill else None)
    counted = _records_written(run.folder)
    several = len(ctx.opts.protocols) > 1
    for i, (pctx, task, method, size, batch) in enumerate(mine):
        if (key := (method, size) if on_gpu else ()) not in warmed:
            warm_up(ctx, method, size)
            warmed.add(key)
        try:
            records = suite.run(pctx, task, batch, method, size)
        except (torch.OutOfMemoryError, MemoryError):  # the rest of this configuration is out of memory too
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
            rest = [item for item in mine[i:] if _config(item) == _config(mine[i])]
            records = [r for (_, _, _, _, b) in rest for r in suite.oom(pctx, task, b, method, size)]
            mine[i + 1:] = [item for item in mine[i + 1:] if _config(item) != _config(mine[i])]
        for record in records:
            log.append(record)
        if progress:  # rank 0 of several counts every rank's records: the bar shows the whole run
            now = _records_written(run.folder) if ranks.world > 1 else counted + batch.units
            label = f"{method}@{size if size is not None else '-'} {task.name}" + (f" {pctx.protocol}" if several else "")
            progress(label, now - counted)
            counted = now
        last = i + 1 == len(mine) or _config(mine[i + 1]) != _config(mine[i])
        if last:
            pctx.contexts.clear()  # compressed contexts are shared within one configuration only
        if ranks.world == 1 and last:
            write_summaries(run.folder, ctx.info)
    barrier(ranks)  # every rank has finished its share
    if progress and ranks.world > 1:
        progress("all ranks done", _records_written(run.folder) - counted)
    return write_summaries(run.folder, ctx.info) if ranks.main else []


def _config(item: WorkItem) -> tuple[str, str, str, str]:
    return item[0].protocol, item[1].name, item[2], str(item[3])


def _records_written(folder: Path) -> int:
    """Lines in all of the run's sample logs (each a record)."""
    return sum(1 for path in sample_files(folder) for _ in path.open(encoding="utf-8", errors="replace"))
