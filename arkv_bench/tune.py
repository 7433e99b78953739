"""`arkv-bench tune`: search ARKV's hyper-parameters (tau1, tau2, tau3, gamma) with Optuna.

    arkv-bench tune --suite lm-eval --tasks gsm8k --quant-type mix --cache-size 1024 --trials 20 --limit 50

One trial = one evaluation of the suite's tasks with the trial's values (the model is loaded
and the prompts are built once). The objective is the mean over tasks of a summary.csv
column, by default `score` (maximised); the sampler is TPE, seeded. The study lives in
Optuna's own storage (by default a SQLite file next to the outputs), so running the same
command again carries on until `--trials` trials are complete. Outputs, in
`<out>/<study>/`:

- `best.yaml`: the best values as `method_options` with the run's suite, tasks, method and
  cache size, in the form `arkv-bench run --config` takes;
- `trials.csv`: every trial: its state, value, parameters and per-task scores.

The paper's values (tau1 7.7744, tau2 5.4070, tau3 5.5277, gamma 263.81) are inside the
default ranges and are tried first, so the search starts from them.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from arkv_bench.cache import METHODS
from arkv_bench.results_io import atomic_write, csv_text
from arkv_bench.cache.arkv import PAPER
from arkv_bench.options import RunOptions, UsageError, config_mapping
from arkv_bench.suites import higher_is_better

# log-uniform ranges; each holds the paper's value with room on both sides
DEFAULT_RANGES: dict[str, tuple[float, float]] = {"tau1": (0.5, 50.0), "tau2": (0.5, 50.0), "tau3": (0.5, 50.0),
                                                  "gamma": (1.0, 5000.0)}
DIRECTIONS = {"score": "maximize", "prefill_tok_s": "maximize", "decode_tok_s": "maximize", "kv_ratio": "minimize",
              "kv_bytes": "minimize", "ttft_ms": "minimize", "itl_ms_p50": "minimize", "itl_ms_p99": "minimize",
              "peak_mem_bytes": "minimize", "evicted_frac": "maximize", "quantized_frac": "maximize"}


class TuneError(UsageError):
    """Bad tune input; the message names the problem and the fix."""


@dataclass
class TuneOptions:
    run: RunOptions  # suite, tasks, one method, one cache size, fixed method options, model, limit...
    trials: int = 20
    metric: str = "score"
    storage: str | None = None  # Optuna storage URL; None: sqlite:///<out>/<study>/optuna.db
    study_name: str | None = None
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)  # empty: DEFAULT_RANGES
    out: Path = Path("results/tune")
    config_out: Path | None = None  # None: <out>/<study>/best.yaml
    paper_start: bool = True  # try the paper's values first


@dataclass
class TuneResult:
    study_name: str
    storage: str
    best_params: dict[str, float]
    best_value: float | None
    complete: int
    config_path: Path
    csv_path: Path


# --- parsing and checks ----------------------------------------------------------------------------

def parse_range(text: str) -> tuple[str, tuple[float, float]]:
    """'tau1=1:20' (or 'tau1=1,20') -> ('tau1', (1.0, 20.0))."""
    if "=" not in text:
        raise TuneError(f"--range {text!r} must look like NAME=LOW:HIGH, e.g. tau1=1:20")
    name, _, span = text.partition("=")
    parts = span.replace(",", ":").split(":")
    try:
        low, high = (float(p) for p in parts)
    except ValueError:
        raise TuneError(f"--range {text!r} must look like NAME=LOW:HIGH with two numbers, e.g. gamma=10:1000") from None
    if not low < high:
        raise TuneError(f"--range {text!r}: LOW must be below HIGH")
    return name.strip(), (low, high)


def search_space(method: str, ranges: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """The ranges to search: the defaults for the ARKV options this method has, overridden by `ranges`."""
    defaults = METHODS[method].defaults
    space = {k: v for k, v in DEFAULT_RANGES.items() if k in defaults}
    for name, (low, high) in ranges.items():
        default = defaults.get(name)
        if name not in defaults or name in ("cache_size", "window_size") or isinstance(default, bool) \
                or not isinstance(default, (int, float)):
            numeric = [k for k, v in defaults.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                       and k not in ("cache_size", "window_size")]
            raise TuneError(f"--range {name}: method {method!r} has no numeric option {name!r}; "
                            f"it has {', '.join(numeric) or 'none'}")
        if low < 0:
            raise TuneError(f"--range {name}: options are non-negative, got {low}")
        space[name] = (low, high)
    if not space:
        raise TuneError(f"method {method!r} has none of tau1, tau2, tau3, gamma: "
                        f"give its ranges with --range NAME=LOW:HIGH")
    return space


def check(opts: TuneOptions) -> tuple[str, int | float | None, dict[str, tuple[float, float]]]:
    """(method, cache size, search space), or TuneError."""
    run = opts.run
    if len(run.quant_types) != 1:
        raise TuneError(f"tune searches one method at a time, got --quant-type {','.join(run.quant_types)}")
    method = run.quant_types[0]
    if method not in METHODS:
        raise TuneError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    if METHODS[method].budgeted and len(run.cache_sizes) != 1:
        raise TuneError(f"tune uses one cache size at a time, got {len(run.cache_sizes)}")
    if opts.trials < 1:
        raise TuneError(f"--trials must be at least 1, got {opts.trials}")
    if opts.metric not in DIRECTIONS:
        raise TuneError(f"--metric {opts.metric!r} is not a summary column tune can optimise; "
                        f"choose one of {', '.join(DIRECTIONS)}")
    size = run.cache_sizes[0] if METHODS[method].budgeted else None
    space = search_space(method, opts.ranges)
    fixed = sorted(set(space) & set(run.method_options))
    if fixed:
        raise TuneError(f"{fixed[0]} is both searched and fixed by --method-option; drop one of them")
    return method, size, space


def study_key(opts: TuneOptions, space: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """What a study was made for: resuming it with other options would mix incomparable trials."""
    run = {k: v for k, v in dataclasses.asdict(opts.run).items() if k not in ("device",)}
    return json.loads(json.dumps({"run": run, "metric": opts.metric, "space": space}, sort_keys=True, default=str))


def default_study_name(opts: TuneOptions, space: dict[str, tuple[float, float]]) -> str:
    run = opts.run
    digest = hashlib.sha1(json.dumps(study_key(opts, space), sort_keys=True).encode()).hexdigest()[:8]
    size = run.cache_sizes[0] if METHODS[run.quant_types[0]].budgeted else "full"
    return f"{run.suite}-{run.quant_types[0]}-{size}-{digest}"


# --- evaluation ------------------------------------------------------------------------------------

class Evaluator:
    """Loads the model, builds the prompts and warms up once; each call evaluates one set of method
    options on every task of the suite and returns the summary rows (one per task)."""

    def __init__(self, run: RunOptions, method: str, size: int | float | None):
        from arkv_bench.models import ModelError
        from arkv_bench.runner import load_context, validate, warm_up
        from arkv_bench.suites import DataError

        self.run, self.method, self.size = run, method, size
        try:
            self.suite = validate(run)
            self.ctx = load_context(run)
            self.tasks = self.suite.plan(self.ctx)
        except (ModelError, DataError) as e:
            raise TuneError(str(e)) from e
        from arkv_bench.cache import prepare_model

        prepare_model(self.ctx.model)
        warm_up(self.ctx, method, size)

    def __call__(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        from arkv_bench.results import summarise

        ctx = dataclasses.replace(self.ctx, opts=dataclasses.replace(
            self.run, method_options={**self.run.method_options, **params}))
        records = [record.to_json() for task in self.tasks
                   for batch in self.suite.batches(ctx, task, self.method, self.size, [])
                   for record in self.suite.run(ctx, task, batch, self.method, self.size)]
        return summarise(records, self.ctx.info, self.run.window_size)


def objective_value(rows: list[dict[str, Any]], metric: str) -> float:
    """The mean over tasks of one summary column."""
    values = []
    for row in rows:
        value = row.get(metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise TuneError(f"task {row.get('task')!r} has no {metric!r} value (a corpus-level lm-eval metric such as "
                            f"perplexity has no per-sample score): tune another task or --metric")
        values.append(float(value))
    if not values:
        raise TuneError("the evaluation produced no summary rows (no samples?)")
    return sum(values) / len(values)


# --- the study -----------------------------------------------------------------------------------

def _suggest(trial: Any, method: str, space: dict[str, tuple[float, float]]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name, (low, high) in space.items():
        if isinstance(METHODS[method].defaults[name], int):
            params[name] = trial.suggest_int(name, int(math.ceil(low)), int(high), log=low > 0)
        else:
            params[name] = trial.suggest_float(name, low, high, log=low > 0)
    return params


def open_study(opts: TuneOptions, name: str, storage: str, direction: str, seed: int, key: dict[str, Any]) -> Any:
    import optuna

    url = storage
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # heartbeats (which fail trials of a killed process) are "experimental"
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        store = optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180) if "://" in url else url
    study = optuna.create_study(study_name=name, storage=store, direction=direction, load_if_exists=True,
                                sampler=optuna.samplers.TPESampler(seed=seed))
    previous = study.user_attrs.get("arkv_key")
    if previous is None:
        study.set_user_attr("arkv_key", key)
    elif previous != key:
        raise TuneError(f"study {name!r} in {storage} was made with other options; choose another --study-name "
                        f"(or remove the study) to start a new search")
    # Re-seed with the history's length, so a resumed study does not replay its first random draws.
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials))
    return study


def run_tune(opts: TuneOptions, progress: Callable[[int, int, float | None], None] | None = None,
             evaluator: Callable[[dict[str, Any]], list[dict[str, Any]]] | None = None) -> TuneResult:
    """Run (or resume) the study until `opts.trials` trials are complete; write best.yaml and trials.csv."""
    import optuna
    import torch

    method, size, space = check(opts)
    key = study_key(opts, space)
    name = opts.study_name or default_study_name(opts, space)
    folder = Path(opts.out) / name
    storage = opts.storage or f"sqlite:///{(folder / 'optuna.db').as_posix()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    direction = DIRECTIONS[opts.metric]
    if opts.metric == "score" and not higher_is_better(opts.run.suite):  # a loss (ppl's perplexity)
        direction = "minimize"
    study = open_study(opts, name, storage, direction, opts.run.seed or 0, key)
    csv_path = folder / "trials.csv"
    config_path = opts.config_out or folder / "best.yaml"

    def complete() -> int:
        return sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)

    remaining = opts.trials - complete()
    if remaining > 0:
        evaluate = evaluator or Evaluator(opts.run, method, size)
        paper = {k: PAPER[k] for k in space if k in PAPER}
        tried = [t.params for t in study.trials]
        if opts.paper_start and paper and len(paper) == len(space) and paper not in tried \
                and all(space[k][0] <= v <= space[k][1] for k, v in paper.items()):
            study.enqueue_trial(paper)

        def objective(trial: Any) -> float:
            params = _suggest(trial, method, space)
            rows = evaluate(params)
            trial.set_user_attr("tasks", {r["task"]: r.get(opts.metric) for r in rows})
            for column in ("score", "kv_ratio", "decode_tok_s"):
                values = [r.get(column) for r in rows if isinstance(r.get(column), (int, float))]
                trial.set_user_attr(column, sum(values) / len(values) if values else None)
            return objective_value(rows, opts.metric)

        def after(study: Any, trial: Any) -> None:
            write_trials_csv(study, csv_path, space)
            if progress:
                progress(complete(), opts.trials, _best_value(study))

        if progress:
            progress(complete(), opts.trials, _best_value(study))
        while complete() < opts.trials:
            study.optimize(objective, n_trials=opts.trials - complete(), callbacks=[after],
                           catch=(torch.OutOfMemoryError, MemoryError))
            if all(t.state != optuna.trial.TrialState.COMPLETE for t in study.trials[-opts.trials:]):
                break  # every trial failing: stop rather than loop forever
    write_trials_csv(study, csv_path, space)
    best_value = _best_value(study)
    if best_value is None:
        raise TuneError(f"no trial of study {name!r} completed; see {csv_path}")
    best = dict(study.best_trial.params)
    write_config(opts, method, size, best, config_path, name, best_value, complete())
    return TuneResult(study_name=name, storage=storage, best_params=best, best_value=best_value,
                      complete=complete(), config_path=config_path, csv_path=csv_path)


def _best_value(study: Any) -> float | None:
    try:
        return study.best_value
    except ValueError:  # no complete trial yet
        return None


def _round(value: Any) -> Any:
    return float(f"{value:.6g}") if isinstance(value, float) else value


def write_config(opts: TuneOptions, method: str, size: int | float | None, best: dict[str, Any], path: Path,
                 study: str, value: float, trials: int) -> Path:
    """The best values as a `run --config` file (keys of options.CONFIG_KEYS)."""
    run = opts.run
    config: dict[str, Any] = {"suite": run.suite}
    config["quant_type"] = method
    if size is not None:
        config["cache_size"] = size
    config.update(config_mapping(run))
    config["method_options"] = {**run.method_options, **{k: _round(v) for k, v in best.items()}}
    header = (f"# arkv-bench tune: best of {trials} complete trials of study {study!r}\n"
              f"# {opts.metric} = {value:.4g} ({DIRECTIONS[opts.metric]}), tuned with limit={run.limit} "
              f"on {datetime.date.today().isoformat()}\n"
              f"# use: arkv-bench run --config {path}\n")
    return atomic_write(path, header + yaml.safe_dump(config, sort_keys=False, allow_unicode=True))


def write_trials_csv(study: Any, path: Path, space: dict[str, tuple[float, float]]) -> Path:
    """Every trial: number, state, value, the searched values, per-task values, mean score / kv ratio / tok/s."""
    trials = study.trials
    tasks = sorted({t for trial in trials for t in (trial.user_attrs.get("tasks") or {})})
    columns = ["number", "state", "value", *space, *[f"task:{t}" for t in tasks], "score", "kv_ratio",
               "decode_tok_s", "duration_s", "datetime_start"]
    rows = []
    for t in trials:
        per_task = t.user_attrs.get("tasks") or {}
        rows.append({"number": t.number, "state": t.state.name, "value": t.value,
                     **{k: t.params.get(k) for k in space}, **{f"task:{k}": per_task.get(k) for k in tasks},
                     "score": t.user_attrs.get("score"), "kv_ratio": t.user_attrs.get("kv_ratio"),
                     "decode_tok_s": t.user_attrs.get("decode_tok_s"),
                     "duration_s": t.duration.total_seconds() if t.duration else None,
                     "datetime_start": t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else None})
    return atomic_write(path, csv_text(columns, rows))


logging.getLogger("optuna").setLevel(logging.WARNING)
