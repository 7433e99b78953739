"""The `lm-eval` suite: lm-evaluation-harness tasks run with one (method, cache size) at a time.

    arkv-bench run --suite lm-eval --tasks gsm8k,commonsense_qa --quant-type full,mix --cache-size 1024

Each (task, method, cache size) is one `lm_eval.simple_evaluate` call with the `arkv` model
(arkv_bench.lm_eval_model) wrapped around the already loaded model. Its per-sample results
become samples.jsonl records: `score` is the task's main metric for that sample (its first
metric under its first filter, e.g. `exact_match,strict-match` for gsm8k, `acc,none` for a
multiple-choice task), in lm-eval's own 0..1 unit; the timings and kv bytes come from the
model's request log. Metrics that exist only for the whole corpus (perplexity, BLEU) have
no per-sample score: the record's `score` is None and `extra["task_score"]` holds lm-eval's
aggregate.

`--data-dir` is lm-eval's include_path here: a folder of task YAMLs, e.g. tasks that read
local files (`dataset_path: json` with `dataset_kwargs: {data_files: ...}`). Without a
network, a task whose data is on the Hub and not in the local cache fails at once with a
message that says so.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arkv_bench.options import RunOptions, UsageError
from arkv_bench.results import SampleRecord, column_means, evicted_quantized, layer_vector, mean_of
from arkv_bench.suites.base import Batch, Context, Suite, Task

logger = logging.getLogger(__name__)
_TASK_MANAGERS: dict[tuple[str | None, bool], Any] = {}


class LmEvalError(UsageError):
    """A task that cannot be run (unknown, or its data unavailable); the message says what to do."""


@dataclass
class LmEvalRun:
    """What one (tasks, method, cache size) evaluation produced."""

    records: list[SampleRecord]  # samples.jsonl records, one per (leaf task, document)
    scores: dict[str, float | None]  # leaf task -> lm-eval's aggregate of its main metric (0..1 for acc-like)
    metrics: dict[str, str]  # leaf task -> "metric,filter" of the main metric
    results: dict[str, Any] = field(default_factory=dict)  # lm-eval's results["results"]


# --- tasks ---------------------------------------------------------------------------------------

def task_manager(tasks: list[str] | None, include_path: str | Path | None = None) -> Any:
    """lm-eval's TaskManager (cached per include_path). Indexing lm-eval's own ~10k tasks takes
    about 10 s on a small CPU, so when every requested task is in `include_path`, only that
    folder is indexed."""
    from lm_eval.tasks import TaskManager

    path = str(include_path) if include_path else None
    if path and tasks:
        local = _TASK_MANAGERS.get((path, False))
        if local is None:
            local = _TASK_MANAGERS[(path, False)] = TaskManager(include_path=path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = _TASK_MANAGERS.get((path, True))
    if manager is None:
        manager = _TASK_MANAGERS[(path, True)] = TaskManager(include_path=path)
    return manager


def check_tasks(tasks: list[str] | None, include_path: str | Path | None = None) -> list[str]:
    """The task names, each known to lm-eval (task, group or tag); raises LmEvalError otherwise."""
    if not tasks:
        raise LmEvalError("--suite lm-eval needs --tasks (lm-eval task, group or tag names, e.g. gsm8k,arc_easy)")
    if include_path is not None and not Path(include_path).is_dir():
        raise LmEvalError(f"--data-dir {include_path} is not a folder of lm-eval task YAMLs")
    manager = task_manager(tasks, include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        where = f" (nor in --data-dir {include_path})" if include_path else ""
        raise LmEvalError(f"unknown lm-eval task {unknown[0]!r}{where}{hint} See `lm-eval ls tasks`.")
    return list(tasks)


@contextmanager
def offline_datasets() -> Iterator[bool]:
    """With HF_HUB_OFFLINE set or the Hub unreachable, make `datasets` fail at once instead of
    retrying for ~40 s (both libraries read the variable only at import). Yields whether offline."""
    from arkv_bench.models import hub_offline, hub_reachable

    if not (hub_offline() or not hub_reachable()):
        yield False
        return
    import datasets.config
    import huggingface_hub.constants

    saved = [(mod, name, getattr(mod, name)) for mod, name in
             ((huggingface_hub.constants, "HF_HUB_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE"),
              (datasets.config, "HF_DATASETS_OFFLINE")) if hasattr(mod, name)]
    for mod, name, _ in saved:
        setattr(mod, name, True)
    try:
        yield True
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)


@contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """No lm-eval / datasets progress bars or info logs inside an arkv-bench run (it has its own bar)."""
    import datasets
    import lm_eval.api.task as lm_task
    import lm_eval.evaluator as lm_evaluator
    from tqdm import tqdm

    log = logging.getLogger("lm_eval")
    level, bars = log.level, datasets.is_progress_bar_enabled()
    original = getattr(lm_task, "tqdm", None)
    git_hash = getattr(lm_evaluator, "get_git_commit_hash", None)
    log.setLevel(logging.ERROR)
    if git_hash is not None:  # it lets git print "fatal: not a git repository" outside one; config.json has the commit
        lm_evaluator.get_git_commit_hash = lambda: None
    datasets.disable_progress_bars()
    if original is not None:  # the per-document "building contexts" bar
        lm_task.tqdm = lambda *a, **k: tqdm(*a, **{**k, "disable": True})
    try:
        yield
    finally:
        if original is not None:
            lm_task.tqdm = original
        if git_hash is not None:
            lm_evaluator.get_git_commit_hash = git_hash
        log.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def load_tasks(tasks: list[str], manager: Any, offline: bool) -> list[Any]:
    """Build the leaf Task objects (this reads their data); a data failure names the task and the fix."""
    built: list[Any] = []
    for name in tasks:
        try:
            loaded = manager.load([name])
        except Exception as e:  # datasets/huggingface_hub raise many types; the message is what matters
            text = (str(e).strip().splitlines() or [type(e).__name__])[0]
            if offline:
                raise LmEvalError(
                    f"lm-eval task {name!r} cannot load its data offline ({text}). There is no network here and "
                    f"the dataset is not in the local Hugging Face cache: copy the data to local files and point a "
                    f"task YAML at them (dataset_path: json, dataset_kwargs: {{data_files: ...}}), then pass its "
                    f"folder with --data-dir") from e
            raise LmEvalError(f"lm-eval task {name!r} could not be loaded: {type(e).__name__}: {text}") from e
        built += list(loaded["tasks"].values())
    return built


# --- one evaluation ------------------------------------------------------------------------------

def run_lm_eval(ctx: Context, tasks: list[str], method: str, size: int | float | None, *, manager: Any = None,
                requested: str | None = None) -> LmEvalRun:
    """Evaluate `tasks` with one method and cache size on the context's model and its run options.

    `requested` is the name recorded as `extra["lm_eval_task"]` (the name the user asked for,
    when it is a group)."""
    import lm_eval

    from arkv_bench.budgets import cache_options
    from arkv_bench.lm_eval_model import ArkvLM

    opts = ctx.opts
    include = opts.data_dir
    manager = manager or task_manager(tasks, include)
    options = {k: v for k, v in cache_options(method, None, opts.window_size, opts.method_options).items()
               if k not in ("cache_size", "window_size")}
    lm = ArkvLM(pretrained=ctx.model, tokenizer=ctx.tokenizer, quant_type=method, cache_size=size,
                window_size=opts.window_size, batch_size=opts.batch_size, info=ctx.info,
                max_length=getattr(opts, "max_length", None), progress_bars=False, **options)
    chat = opts.chat_template == "on"
    seed = opts.seed or 0
    with offline_datasets() as offline, quiet_lm_eval():
        built = load_tasks(tasks, manager, offline)
        results = lm_eval.simple_evaluate(
            model=lm, tasks=built, task_manager=manager, limit=opts.limit, num_fewshot=opts.num_fewshot,
            log_samples=True, apply_chat_template=chat, bootstrap_iters=0, random_seed=seed,
            numpy_random_seed=1234 + seed, torch_random_seed=1234 + seed, fewshot_random_seed=1234 + seed)
    return to_records(results, lm.reset_log(), method, size, opts.window_size, chat,
                      requested or (tasks[0] if len(tasks) == 1 else None), ctx.info.get("weights_bytes"))


def main_metric(results: dict[str, Any], task: str) -> tuple[str, str] | None:
    """(metric, filter) of a task's main metric: its first metric under its first filter."""
    res = results.get("results", {}).get(task, {})
    cfg = results.get("configs", {}).get(task, {})
    metrics = [m["metric"] for m in cfg.get("metric_list") or [] if isinstance(m.get("metric"), str)]
    filters = [f["name"] for f in cfg.get("filter_list") or [] if isinstance(f, dict) and "name" in f] or ["none"]
    for metric in metrics:
        for filt in filters:
            if f"{metric},{filt}" in res:
                return metric, filt
    keys = [k for k in res if "," in k and "_stderr" not in k]
    return tuple(keys[0].split(",", 1)) if keys else None  # type: ignore[return-value]


def to_records(results: dict[str, Any], log: list[dict[str, Any]], method: str, size: int | float | None,
               window: int, chat: bool, requested: str | None, weights: int | None = None) -> LmEvalRun:
    """lm-eval's logged samples + the model's request log -> samples.jsonl records."""
    by_doc: dict[tuple[str, Any], list[dict[str, Any]]] = defaultdict(list)
    for entry in log:
        by_doc[(entry["task"], entry["doc_id"])].append(entry)
    records, scores, metrics = [], {}, {}
    for task, samples in (results.get("samples") or {}).items():
        main = main_metric(results, task)
        if main is None:
            continue
        metric, filt = main
        key = f"{metric},{filt}"
        aggregate = results["results"][task].get(key)
        metrics[task] = key
        scores[task] = float(aggregate) if isinstance(aggregate, (int, float)) else None
        for sample in samples:
            if sample.get("filter", "none") != filt:
                continue
            entries = by_doc.get((task, sample["doc_id"]), [])
            records.append(_record(task, sample, entries, metric, key, scores[task], method, size, window, chat,
                                   requested or task, weights))
    return LmEvalRun(records=records, scores=scores, metrics=metrics, results=results.get("results", {}))


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(float(value)):
        return float(value)
    try:  # numpy scalars
        return float(value.item()) if hasattr(value, "item") and value.size == 1 else None
    except (TypeError, ValueError):
        return None


def _prediction(sample: dict[str, Any], request_type: str | None) -> tuple[str, list[str]]:
    """What the model answered and the reference(s), as text."""
    args = sample.get("arguments") or []
    target = sample.get("target")
    resps = sample.get("filtered_resps") or []
    if request_type == "loglikelihood" and len(args) > 1:
        choices = [a[1] for a in args]
        lls = [r[0] if isinstance(r, (list, tuple)) else r for r in resps]
        pred = choices[max(range(len(lls)), key=lambda i: lls[i])].strip() if lls else ""
        if isinstance(target, int) and 0 <= target < len(choices):
            return pred, [choices[target].strip()]
        return pred, [str(target)]
    if request_type == "loglikelihood_rolling":
        return "", []
    pred = resps[0] if resps else ""
    pred = pred if isinstance(pred, str) else str(pred)
    refs = [str(t) for t in target] if isinstance(target, list) else [str(target)]
    return pred, refs


def _record(task: str, sample: dict[str, Any], entries: list[dict[str, Any]], metric: str, key: str,
            task_score: float | None, method: str, size: int | float | None, window: int, chat: bool,
            requested: str, weights: int | None) -> SampleRecord:
    kind = entries[0]["request_type"] if entries else None
    prediction, references = _prediction(sample, kind)
    owned = [e for e in entries if e["request_type"] != "generate_until" or e["batch_row"] == 0]
    seen_groups: set[Any] = set()
    prefill_s, prompt_tokens = 0.0, 0
    for e in entries:
        group = e.get("prefill_group", id(e))
        if group in seen_groups:
            continue
        seen_groups.add(group)
        prompt_tokens += e["prompt_tokens"]
        if e in owned:
            prefill_s += e["prefill_s"]
        if e["request_type"] == "loglikelihood_rolling":  # the document itself is the input
            prompt_tokens += e.get("continuation_tokens", 0)
            prefill_s += e.get("score_s", 0.0)
    generated = [e for e in entries if e["request_type"] == "generate_until"]
    if generated:
        ttft_ms = generated[0]["ttft_s"] * 1000
    else:
        first = entries[0] if entries else {}
        ttft_ms = (first.get("prefill_s", 0.0) + first.get("score_s", 0.0)) * 1000
    itl_ms = [t * 1000 for e in generated if e["batch_row"] == 0 for t in e["itl_s"]]
    per_layer = _layer_fractions(entries)
    evicted, quantized = evicted_quantized(per_layer)
    peaks = [e["peak_mem_bytes"] for e in entries if e.get("peak_mem_bytes") is not None]
    value = sample.get(metric)
    extra: dict[str, Any] = {"lm_eval_task": requested, "metric": key, "request_type": kind,
                             "requests": len(entries), "chat_template": chat}
    score = _number(value)
    if score is None:
        extra["task_score"] = task_score
        if isinstance(value, (list, tuple)):
            extra["metric_items"] = [_number(v) for v in value]
    return SampleRecord(
        suite=SUITE.name, task=task, sample_id=str(sample["doc_id"]), quant_type=method, cache_size=size,
        window_size=window, budget=entries[0].get("budget") if entries else None, prompt_tokens=prompt_tokens,
        prediction=prediction, references=references, score=score, prefill_s=prefill_s, ttft_ms=ttft_ms,
        itl_ms=itl_ms, decode_tokens=sum(e["decode_tokens"] for e in entries),
        decode_steps=sum(e.get("decode_steps", 0) for e in generated),
        decode_s=sum(e.get("decode_s", 0.0) for e in generated),
        batch_id=str(generated[0]["batch_id"]) if generated else f"{task}/{sample['doc_id']}",
        batch_rows=max((e["batch_rows"] for e in entries), default=1),
        batch_row=0 if owned else entries[0]["batch_row"],
        kv_bytes=mean_of([e["kv_bytes"] for e in entries]) or 0.0,
        kv_bytes_full=mean_of([e["kv_bytes_full"] for e in entries]) or 0.0,
        compressed=any(e["compressed"] for e in entries), evicted_frac=evicted, quantized_frac=quantized,
        peak_mem_bytes=max(peaks) if peaks else None, weights_bytes=weights, layers=per_layer, extra=extra)


def _layer_fractions(entries: list[dict[str, Any]]) -> list[list[float | None]]:
    """Per layer, means over the document's requests: [oq_score, oq_ratio, original, quantized, evicted]."""
    rows: dict[int, list[list[float | None]]] = defaultdict(list)
    for e in entries:
        for i, layer in enumerate(e.get("layers") or []):
            rows[i].append(layer_vector(layer))
    return [column_means(rows[i]) for i in sorted(rows)]


# --- the suite ---------------------------------------------------------------------------------------

class LmEval(Suite):
    """Any lm-evaluation-harness task, group or tag: one simple_evaluate per (task, method, cache size)."""

    name = "lm-eval"
    description = "any lm-eval task, group or tag (`lm-eval ls tasks`); --data-dir = its include_path"

    def task_names(self) -> list[str]:
        return []

    def check(self, opts: RunOptions) -> None:
        check_tasks(opts.tasks, opts.data_dir)

    def plan(self, ctx: Context) -> list[Task]:
        tasks = check_tasks(ctx.opts.tasks, ctx.opts.data_dir)
        return [Task(name=name, chat=ctx.opts.chat_template == "on") for name in tasks]

    def units(self, task: Task) -> int:
        return 1

    def batches(self, ctx: Context, task: Task, method: str, size: int | float | None,
                records: list[dict[str, Any]]) -> list[Batch]:
        done = any((r.get("extra") or {}).get("lm_eval_task") == task.name for r in records)
        return [] if done else [Batch(samples=[], units=1)]

    def run(self, ctx: Context, task: Task, batch: Batch, method: str, size: int | float | None
            ) -> list[SampleRecord]:
        manager = task_manager([task.name], ctx.opts.data_dir)
        return run_lm_eval(ctx, [task.name], method, size, manager=manager, requested=task.name).records

    def oom(self, ctx: Context, task: Task, batch: Batch, method: str, size: int | float | None
            ) -> list[SampleRecord]:
        return [SampleRecord(suite=self.name, task=task.name, sample_id="-", quant_type=method, cache_size=size,
                             window_size=ctx.opts.window_size, status="oom", extra={"lm_eval_task": task.name})]


SUITE = LmEval()
