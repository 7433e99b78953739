"""Compare compression methods against the full-cache baseline.

A method's numbers only mean something next to the full cache of the *same* model, dtype,
suite and task, so every ratio here is computed against exactly that row and nothing
else. When no such baseline exists the ratios stay empty and a note says why: a ratio
against some other model's baseline would look plausible and be wrong.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from rich.markup import escape as rich_escape
from rich.table import Table

from arkv_bench.results_io import Run, atomic_write, check_writable_file

AVG_TASK = "AVG"
EMPTY = "—"
BENCH_SUITE = "bench"  # `arkv-bench bench`: one task per cell, never averaged over cells
_BENCH_CELL = re.compile(r"(?:b(\d+)|max batch) x (\d+)")


def bench_task(batch: int | None, context: int) -> str:
    """The task name of a bench cell ('b8 x 32768'), or of a max-batch search (batch None)."""
    return f"{'max batch' if batch is None else f'b{batch}'} x {context}"


def parse_bench_task(task: str | None) -> tuple[int | None, int] | None:
    """(batch or None for a max-batch row, context) of a bench task name; None for other names."""
    match = _BENCH_CELL.fullmatch(task or "")
    return None if match is None else (int(match[1]) if match[1] else None, int(match[2]))

Row = dict[str, Any]


@dataclass
class ComparisonRow:
    """One method at one cache size on one task (or the suite average, task 'AVG')."""

    run: str
    model: str | None
    dtype: str | None
    suite: str | None
    task: str | None
    quant_type: str | None
    cache_size: int | float | str | None
    n: int | None
    status: str | None
    is_baseline: bool
    score: float | None
    score_ci95: float | None
    baseline_score: float | None
    score_pct_of_baseline: float | None
    kv_bytes: float | None
    kv_ratio_vs_baseline: float | None
    decode_tok_s: float | None
    decode_tok_s_ratio: float | None
    ttft_ms: float | None
    peak_mem_bytes: float | None
    peak_mem_ratio: float | None
    compressed_frac: float | None
    protocol: str = "query-aware"  # rows of summaries written before protocols existed are query-aware
    higher_is_better: bool = True  # False where the score is a loss (ppl): the best score is the lowest

    @property
    def group(self) -> tuple[Any, ...]:
        """Rows in the same group are directly comparable (same model/dtype/suite/task)."""
        return (self.model, self.dtype, self.suite, self.task)

    @property
    def method(self) -> str:
        """Short label such as 'mix@512' or 'full'."""
        name = self.quant_type or "?"
        if self.is_baseline or self.cache_size in (None, "full"):
            return name
        return f"{name}@{format_cache_size(self.cache_size)}"


COLUMNS = [f.name for f in fields(ComparisonRow)]


@dataclass
class Comparison:
    """Result of `compare`: rows (per task and suite averages) plus notes on gaps."""

    baseline: str
    rows: list[ComparisonRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_csv(self, path: Path) -> Path:
        """Write every column; unmeasured values are empty cells, as in summary.csv."""
        return atomic_write(check_writable_file(path, "--out"), self.to_csv_text())

    def to_csv_text(self) -> str:
        """CSV text of `to_csv`, for callers that print or embed it."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(COLUMNS)
        for row in self.rows:
            writer.writerow(_csv_cell(getattr(row, name)) for name in COLUMNS)
        return buffer.getvalue()

    def to_json(self) -> str:
        """JSON with nulls for unmeasured values (machine-readable, lossless)."""
        payload = {
            "baseline": self.baseline,
            "rows": [asdict(row) for row in self.rows],
            "notes": list(self.notes),
        }
        return json.dumps(payload, indent=2, allow_nan=False)

    def to_markdown(self) -> str:
        """A GitHub table of the display columns, best values in bold, notes below."""
        columns = display_columns(self.rows)
        best = best_cells(self.rows, columns)
        lines = [
            "| " + " | ".join(col.header for col in columns) + " |",
            "| " + " | ".join("---:" if col.numeric else "---" for col in columns) + " |",
        ]
        for index, row in enumerate(self.rows):
            cells = []
            for col in columns:
                text = col.format(getattr(row, col.key)).replace("|", "\\|")
                cells.append(f"**{text}**" if (index, col.key) in best else text)
            lines.append("| " + " | ".join(cells) + " |")
        lines.extend(f"\n> {note}" for note in self.notes)
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- computing


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is unmeasured or the base is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def cache_size_key(value: int | float | str | None) -> tuple[int, float, str]:
    """Sort numbers numerically, then 'full' and other words, then missing values."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    if value is None:
        return (2, 0.0, "")
    return (1, 0.0, str(value))


def _task_key(row: Row) -> tuple[Any, ...]:
    return (row.get("model"), row.get("dtype"), row.get("suite"), row.get("task"))


def _pick_baseline(candidates: list[tuple[str, Row]], run: str, row: Row) -> Row | None:
    """Prefer the baseline at the same cache size, then one from the same run, then ok."""
    if not candidates:
        return None

    def preference(item: tuple[str, Row]) -> tuple[bool, bool, bool, bool]:
        cand_run, cand = item
        return (
            _protocol(cand) != _protocol(row),
            cand.get("cache_size") != row.get("cache_size"),
            cand_run != run,
            cand.get("status") not in (None, "ok"),
        )

    return min(candidates, key=preference)[1]  # min is stable: ties keep file order


def _protocol(row: Row) -> str:
    return str(row.get("protocol") or "query-aware")


def _higher_is_better(suite: Any) -> bool:
    from arkv_bench.suites import higher_is_better

    return higher_is_better(suite)


def _make_row(run: str, row: Row, base: Row | None, baseline: str) -> ComparisonRow:
    base = base or {}
    return ComparisonRow(
        run=run,
        model=row.get("model"),
        dtype=row.get("dtype"),
        suite=row.get("suite"),
        task=row.get("task"),
        quant_type=row.get("quant_type"),
        cache_size=row.get("cache_size"),
        n=row.get("n"),
        status=row.get("status"),
        is_baseline=row.get("quant_type") == baseline,
        score=row.get("score"),
        score_ci95=row.get("score_ci95"),
        baseline_score=base.get("score"),
        score_pct_of_baseline=_percent(ratio(row.get("score"), base.get("score"))),
        kv_bytes=row.get("kv_bytes"),
        kv_ratio_vs_baseline=ratio(row.get("kv_bytes"), base.get("kv_bytes")),
        decode_tok_s=row.get("decode_tok_s"),
        decode_tok_s_ratio=ratio(row.get("decode_tok_s"), base.get("decode_tok_s")),
        ttft_ms=row.get("ttft_ms"),
        peak_mem_bytes=row.get("peak_mem_bytes"),
        peak_mem_ratio=ratio(row.get("peak_mem_bytes"), base.get("peak_mem_bytes")),
        compressed_frac=row.get("compressed_frac"),
        protocol=_protocol(row),
        higher_is_better=_higher_is_better(row.get("suite")),
    )


def _percent(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


def _missing_note(baseline: str, row: Row, whole_suite: bool) -> str:
    where = f"model {row.get('model')} suite {row.get('suite')}"
    if not whole_suite:
        where += f" task {row.get('task')}"
    if row.get("dtype"):
        where += f" (dtype {row.get('dtype')})"
    return f"no `{baseline}` baseline for {where}"


_AVERAGED = ("score", "kv_bytes", "decode_tok_s", "ttft_ms", "peak_mem_bytes", "compressed_frac")


def _mean_or_none(values: list[Any]) -> float | None:
    """Mean only when every task has the value: a mean over a subset would mislead."""
    if not values or any(value is None for value in values):
        return None
    return sum(values) / len(values)


def _average_rows(rows: list[Row]) -> Row:
    """A summary-like row holding the unweighted mean over tasks (score_ci95 unknown)."""
    first = rows[0]
    averaged: Row = {key: first.get(key) for key in ("model", "dtype", "suite", "quant_type", "protocol")}
    averaged["cache_size"] = first.get("cache_size")
    averaged["task"] = AVG_TASK
    for key in _AVERAGED:
        averaged[key] = _mean_or_none([row.get(key) for row in rows])
    counts = [row.get("n") for row in rows]
    averaged["n"] = None if any(c is None for c in counts) else sum(counts)
    statuses = {row.get("status") for row in rows}
    averaged["status"] = "ok" if statuses == {"ok"} else ",".join(sorted(map(str, statuses)))
    averaged["score_ci95"] = None
    return averaged


def _suite_averages(
    entries: list[tuple[str, Row, Row | None]], baseline: str
) -> tuple[list[ComparisonRow], list[str]]:
    """AVG rows per (run, model, dtype, suite, method, cache size) over the suite's tasks."""
    tasks_of: dict[tuple[Any, ...], set[Any]] = {}
    groups: dict[tuple[Any, ...], list[tuple[Row, Row | None]]] = {}
    for run, row, base in entries:
        suite_key = (run, row.get("model"), row.get("dtype"), row.get("suite"))
        tasks_of.setdefault(suite_key, set()).add(row.get("task"))
        method_key = suite_key + (row.get("quant_type"), cache_size_key(row.get("cache_size")), _protocol(row))
        groups.setdefault(method_key, []).append((row, base))

    averages: list[ComparisonRow] = []
    notes: list[str] = []
    for key, members in groups.items():
        suite_tasks = tasks_of[key[:4]]
        if len(suite_tasks) < 2 or key[3] == BENCH_SUITE:
            continue  # a one-task suite's average is the task row itself; bench cells are not alike
        rows = [row for row, _ in members]
        missing = sorted(map(str, suite_tasks - {row.get("task") for row in rows}))
        avg_row = _average_rows(rows)
        if missing:
            avg_row["score"] = None
            notes.append(
                f"no {AVG_TASK} for {rows[0].get('quant_type')}@{rows[0].get('cache_size')} "
                f"on model {key[1]} suite {key[3]}: no row for task(s) {', '.join(missing)}"
            )
        bases = [base for _, base in members if base is not None]
        complete = not missing and len(bases) == len(members)
        avg_base = _average_rows(bases) if complete else None
        averages.append(_make_row(key[0], avg_row, avg_base, baseline))
    return averages, notes


def _row_order(row: ComparisonRow, baseline: str) -> tuple[Any, ...]:
    return (
        str(row.model).casefold(),
        str(row.dtype),
        str(row.suite),
        row.task == AVG_TASK,
        str(row.task),
        row.protocol != "query-aware",
        row.protocol,
        row.quant_type != baseline,
        str(row.quant_type).casefold(),
        cache_size_key(row.cache_size),
        row.run,
    )


def compare(
    runs: Iterable[Run],
    baseline: str = "full",
    suite: str | None = None,
    model: str | None = None,
) -> Comparison:
    """Join every summary row with its `baseline` row of the same model/dtype/suite/task.

    The baseline ignores the cache budget, so any of its cache sizes will do; the same
    cache size is preferred when several exist. Suite averages (task 'AVG') are added for
    suites with several tasks, computed only from complete task sets.
    """
    entries: list[tuple[str, Row]] = []
    for run in runs:
        for row in run.summary:
            if suite is not None and row.get("suite") != suite:
                continue
            if model is not None and row.get("model") != model:
                continue
            entries.append((run.name, row))

    baselines: dict[tuple[Any, ...], list[tuple[str, Row]]] = {}
    suites_with_baseline: set[tuple[Any, ...]] = set()
    for run_name, row in entries:
        if row.get("quant_type") == baseline:
            baselines.setdefault(_task_key(row), []).append((run_name, row))
            suites_with_baseline.add(_task_key(row)[:3])

    matched: list[tuple[str, Row, Row | None]] = []
    notes: list[str] = []
    for run_name, row in entries:
        base = _pick_baseline(baselines.get(_task_key(row), []), run_name, row)
        if base is None:
            whole_suite = _task_key(row)[:3] not in suites_with_baseline
            notes.append(_missing_note(baseline, row, whole_suite))
        matched.append((run_name, row, base))

    rows = [_make_row(run_name, row, base, baseline) for run_name, row, base in matched]
    averages, average_notes = _suite_averages(matched, baseline)
    rows.extend(averages)
    rows.sort(key=lambda r: _row_order(r, baseline))
    losses = sorted({str(r.suite) for r in rows if not r.higher_is_better})
    notes += [f"{name}: the score is a loss (perplexity for ppl), lower is better; % of {baseline} is its ratio to "
              f"{baseline}'s, so above 100% is worse" for name in losses]
    return Comparison(baseline=baseline, rows=rows, notes=_unique(notes + average_notes))


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def suite_level_rows(comparison: Comparison) -> list[ComparisonRow]:
    """One row per method and suite: the AVG row, or the task row of one-task suites.

    Charts that summarise a whole suite (speed, memory) use these so they agree with the
    table rather than inventing their own averaging.
    """
    with_avg = {
        (r.run, r.model, r.dtype, r.suite) for r in comparison.rows if r.task == AVG_TASK
    }
    return [
        r
        for r in comparison.rows
        if r.task == AVG_TASK or (r.run, r.model, r.dtype, r.suite) not in with_avg
    ]


# --------------------------------------------------------------------------- formatting


def format_cache_size(value: int | float | str | None) -> str:
    """'512', '0.2', 'full'; floats lose the trailing zeros a CSV round trip adds."""
    if value is None:
        return EMPTY
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _fmt(pattern: str) -> Callable[[Any], str]:
    def format_value(value: Any) -> str:
        if value is None:
            return EMPTY
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return pattern.format(value)
        return str(value)

    return format_value


def _fmt_fraction(value: Any) -> str:
    return EMPTY if value is None else f"{100 * value:.0f}%"


@dataclass(frozen=True)
class Column:
    """How one ComparisonRow field is shown in tables, and which direction is better."""

    key: str
    header: str
    format: Callable[[Any], str]
    better: str | None = None  # "high", "low" or None (not ranked)
    numeric: bool = True


TABLE_COLUMNS = [
    Column("run", "Run", _fmt("{}"), numeric=False),
    Column("model", "Model", _fmt("{}"), numeric=False),
    Column("dtype", "Dtype", _fmt("{}"), numeric=False),
    Column("suite", "Suite", _fmt("{}"), numeric=False),
    Column("task", "Task", _fmt("{}"), numeric=False),
    Column("quant_type", "Method", _fmt("{}"), numeric=False),
    Column("cache_size", "Cache", format_cache_size),
    Column("protocol", "Protocol", _fmt("{}"), numeric=False),
    Column("n", "n", _fmt("{}")),
    Column("score", "Score", _fmt("{:.1f}"), "high"),
    Column("score_ci95", "±95%", _fmt("±{:.1f}")),
    Column("score_pct_of_baseline", "% of full", _fmt("{:.1f}%"), "high"),
    Column("kv_ratio_vs_baseline", "KV ratio", _fmt("{:.3g}×"), "low"),
    Column("decode_tok_s", "Decode tok/s", _fmt("{:.1f}"), "high"),
    Column("decode_tok_s_ratio", "tok/s ratio", _fmt("{:.3g}×"), "high"),
    Column("peak_mem_ratio", "Peak mem ratio", _fmt("{:.3g}×"), "low"),
    Column("compressed_frac", "Compressed", _fmt_fraction),
    Column("status", "Status", _fmt("{}"), numeric=False),
]

_OPTIONAL_WHEN_CONSTANT = ("run", "dtype", "protocol")
# ranked the score's way: for a loss (ppl) the lowest score and the lowest % of the baseline are best
_SCORE_KEYS = ("score", "score_pct_of_baseline")


def display_columns(rows: list[ComparisonRow]) -> list[Column]:
    """TABLE_COLUMNS minus run/dtype when all rows share one value (less noise)."""
    columns = []
    for col in TABLE_COLUMNS:
        constant = len({getattr(row, col.key) for row in rows}) <= 1
        if col.key in _OPTIONAL_WHEN_CONSTANT and constant:
            continue
        columns.append(col)
    return columns


def best_cells(rows: list[ComparisonRow], columns: list[Column]) -> set[tuple[int, str]]:
    """(row index, column key) of the best value per column within each comparable group.

    Groups are (model, dtype, suite, task): a passkey score is not better or worse than a
    GSM8K score. Ties are all marked; a group with fewer than two values marks nothing. A score
    whose suite is a loss (higher_is_better False) is best when lowest.
    """
    marked: set[tuple[int, str]] = set()
    by_group: dict[tuple[Any, ...], list[int]] = {}
    for index, row in enumerate(rows):
        by_group.setdefault(row.group, []).append(index)
    for col in columns:
        if col.better is None:
            continue
        for indices in by_group.values():
            high = col.better == "high"
            if col.key in _SCORE_KEYS and not rows[indices[0]].higher_is_better:
                high = not high
            pick = max if high else min
            values = {i: getattr(rows[i], col.key) for i in indices}
            values = {i: v for i, v in values.items() if v is not None}
            if len(values) < 2:
                continue
            target = pick(values.values())
            marked.update((i, col.key) for i, v in values.items() if v == target)
    return marked


def render_table(comparison: Comparison) -> Table:
    """A rich Table of the comparison; the best value per column is bold green."""
    columns = display_columns(comparison.rows)
    best = best_cells(comparison.rows, columns)
    table = Table(title=f"vs `{comparison.baseline}` baseline", caption=_caption(comparison))
    for col in columns:
        table.add_column(col.header, justify="right" if col.numeric else "left")
    for index, row in enumerate(comparison.rows):
        cells = []
        for col in columns:
            text = col.format(getattr(row, col.key))
            style = "bold green" if (index, col.key) in best else ""
            cells.append(f"[{style}]{_rich_escape(text)}[/]" if style else _rich_escape(text))
        table.add_row(*cells, style="dim" if row.is_baseline else None)
    return table


def _caption(comparison: Comparison) -> str | None:
    return "\n".join(_rich_escape(note) for note in comparison.notes) or None


def _rich_escape(text: str) -> str:
    """Model/task names are data: keep '[' from being read as rich markup."""
    return rich_escape(text)


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value
