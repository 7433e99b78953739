"""Turn comparison rows, samples and layer stats into report figures.

Each builder returns `Figure`s; a figure whose data was not measured carries a message
instead of a chart, so the report says "not measured" rather than drawing zeros.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from arkv_bench.compare import (
    BENCH_SUITE,
    Comparison,
    ComparisonRow,
    cache_size_key,
    format_cache_size,
    parse_bench_task,
    suite_level_rows,
)
from arkv_bench.report.svg import (
    BASELINE_COLOR,
    PALETTE,
    HLine,
    Series,
    category_axis,
    fmt_num,
    hbar_chart,
    heatmap,
    numeric_axis,
    stacked_columns,
    xy_chart,
)
from arkv_bench.results_io import Run

LAYER_METHODS = ("mix",)  # ARKV: the method whose per-layer OQ statistics are shown
FRACTION_STACKS = (
    ("original_frac", "Original", "#2ca02c"),
    ("quantized_frac", "Quantized", "#1f77b4"),
    ("evicted_frac", "Evicted", "#d62728"),
)


@dataclass
class Figure:
    """A chart (svg) or, when its data is missing, the message shown in its place."""

    title: str
    caption: str
    svg: str | None = None
    missing: str | None = None


@dataclass
class SampleDigest:
    """What the report needs from one run's samples.jsonl, gathered in a single pass."""

    # (suite, task) -> sample id -> records of that sample (all methods / cache sizes)
    browser: dict[tuple[Any, Any], dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    # (quant_type, cache_size, protocol) -> (depth, context_length) -> per-sample scores (0..1)
    passkey: dict[tuple[Any, Any, str], dict[tuple[Any, Any], list[float]]] = field(default_factory=dict)


def digest_samples(run: Run, per_task: int) -> SampleDigest:
    """Keep the first `per_task` sample ids of each task and the passkey grid scores."""
    digest = SampleDigest()
    for record in run.iter_samples():
        task_samples = digest.browser.setdefault((record.get("suite"), record.get("task")), {})
        sample_id = str(record.get("sample_id"))
        if sample_id in task_samples or len(task_samples) < per_task:
            task_samples.setdefault(sample_id, []).append(record)
        extra = record.get("extra")
        score = record.get("score")
        if record.get("suite") == "passkey" and isinstance(extra, dict) and "depth" in extra \
                and "context_length" in extra:
            key = (record.get("quant_type"), record.get("cache_size"), str(record.get("protocol") or "query-aware"))
            cells = digest.passkey.setdefault(key, {})
            scores = cells.setdefault((extra["depth"], extra["context_length"]), [])
            if isinstance(score, (int, float)) and not isinstance(score, bool):
                scores.append(float(score))
    return digest


def method_colors(labels: Iterable[str | None], baseline: str) -> dict[str | None, str]:
    """One stable colour per method name across every figure of the report."""
    names = sorted({label for label in labels if label != baseline}, key=str)
    colors: dict[str | None, str] = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}
    colors[baseline] = BASELINE_COLOR
    return colors


def _groups(rows: Iterable[ComparisonRow]) -> dict[tuple[Any, ...], list[ComparisonRow]]:
    grouped: dict[tuple[Any, ...], list[ComparisonRow]] = {}
    for row in rows:
        if row.suite != BENCH_SUITE:  # speed only: no score to chart
            grouped.setdefault(row.group, []).append(row)
    return grouped


def _series_label(row: ComparisonRow, several_runs: bool, several_protocols: bool = False) -> str:
    name = str(row.quant_type) + (f" · {row.protocol}" if several_protocols else "")
    return f"{name} ({row.run})" if several_runs else name


def _score_axis(row: ComparisonRow) -> str:
    return "score" if row.higher_is_better else "score (a loss: lower is better)"


def _group_caption(row: ComparisonRow) -> str:
    return f"model {row.model} · {row.dtype or 'dtype not recorded'}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _pct_text(row: ComparisonRow, baseline: str) -> str:
    if row.score_pct_of_baseline is None:
        return f"no {baseline} baseline"
    return f"{row.score_pct_of_baseline:.1f}% of {baseline}"


def score_vs_cache(comparison: Comparison, colors: dict[str | None, str]) -> list[Figure]:
    """Score against cache size: one line per method and protocol (query-agnostic dashed), the full
    cache as a horizontal line."""
    figures = []
    for rows in _groups(comparison.rows).values():
        several_runs = len({r.run for r in rows}) > 1
        several_protocols = len({r.protocol for r in rows}) > 1
        methods = [r for r in rows if not r.is_baseline and _is_number(r.cache_size)]
        measured = [r for r in methods if r.score is not None]
        first = rows[0]
        title = f"{first.suite} / {first.task}"
        if not measured:
            figures.append(Figure(title, _group_caption(first), missing="no scored cache sizes"))
            continue
        sizes = sorted({r.cache_size for r in measured}, key=cache_size_key)
        position = {size: float(i) for i, size in enumerate(sizes)}
        series: dict[str, Series] = {}
        for row in sorted(measured, key=lambda r: cache_size_key(r.cache_size)):
            label = _series_label(row, several_runs, several_protocols)
            item = series.setdefault(label, Series(label, colors.get(row.quant_type, PALETTE[0]),
                                                   dashed=row.protocol != "query-aware"))
            score = float(row.score or 0.0)  # `measured` holds scored rows only
            where = f" · {row.protocol}" if several_protocols else ""
            tip = f"{row.method}{where}: {score:.1f} ({_pct_text(row, comparison.baseline)})"
            item.points.append((position[row.cache_size], score, tip))
        hlines = [
            HLine(float(r.score), _series_label(r, several_runs, several_protocols))
            for r in rows
            if r.is_baseline and r.score is not None
        ]
        scores = [p[1] for s in series.values() for p in s.points] + [h.y for h in hlines]
        x = category_axis("cache size (tokens or fraction of prompt)",
                          [format_cache_size(s) for s in sizes])
        y = numeric_axis(_score_axis(first), scores, include_zero=True)
        svg = xy_chart(title, list(series.values()), x, y, _unique_hlines(hlines))
        figures.append(Figure(title, _group_caption(first), svg=svg))
    return figures


def _unique_hlines(hlines: list[HLine]) -> list[HLine]:
    """A baseline run at several cache sizes should draw one line per distinct score."""
    seen: dict[tuple[str, float], HLine] = {}
    for ref in hlines:
        seen.setdefault((ref.label, ref.y), ref)
    return list(seen.values())


def _byte_unit(peak: float) -> tuple[str, float]:
    for unit, size in (("GiB", 2.0**30), ("MiB", 2.0**20), ("KiB", 2.0**10)):
        if peak >= size:
            return unit, size
    return "bytes", 1.0


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool = True) -> list[tuple[float, float]]:
    """Points not beaten by another with less (or equal) memory and a better score."""
    sign = 1.0 if higher_is_better else -1.0
    front: list[tuple[float, float]] = []
    for memory, score in sorted(points, key=lambda p: (p[0], -sign * p[1])):
        if not front or sign * score > sign * front[-1][1]:
            front.append((memory, score))
    return front


def score_vs_memory(comparison: Comparison, colors: dict[str | None, str]) -> list[Figure]:
    """Score against KV-cache bytes per method and budget; the full cache is a square."""
    figures = []
    for rows in _groups(comparison.rows).values():
        first = rows[0]
        title = f"{first.suite} / {first.task}"
        measured = [r for r in rows if r.score is not None and r.kv_bytes is not None]
        if not measured:
            figures.append(Figure(title, _group_caption(first), missing="KV memory not measured"))
            continue
        several_runs = len({r.run for r in rows}) > 1
        several_protocols = len({r.protocol for r in rows}) > 1
        unit, size = _byte_unit(max(float(r.kv_bytes or 0) for r in measured))
        series: dict[str, Series] = {}
        for row in measured:
            label = _series_label(row, several_runs, several_protocols) + (" (full cache)" if row.is_baseline else "")
            agnostic = row.protocol != "query-aware"
            item = series.setdefault(
                label,
                Series(label, colors.get(row.quant_type, PALETTE[0]), line=False,
                       marker="square" if row.is_baseline else "diamond" if agnostic else "circle"),
            )
            memory = float(row.kv_bytes or 0) / size  # `measured` has score and kv_bytes
            score = float(row.score or 0.0)
            where = f" · {row.protocol}" if several_protocols else ""
            tip = f"{row.method}{where}: score {score:.1f}, KV {fmt_num(memory)} {unit}"
            item.points.append((memory, score, tip))
        points = [(p[0], p[1]) for s in series.values() for p in s.points]
        front = Series("Pareto front", "#999999", dashed=True, marker="none",
                       points=[(m, s, "") for m, s in pareto_front(points, first.higher_is_better)])
        x = numeric_axis(f"KV cache memory ({unit})", [p[0] for p in points], include_zero=True)
        y = numeric_axis(_score_axis(first), [p[1] for p in points], include_zero=True)
        svg = xy_chart(title, [front, *series.values()], x, y)
        figures.append(Figure(title, _group_caption(first), svg=svg))
    return figures


def speed_figures(comparison: Comparison, colors: dict[str | None, str]) -> list[Figure]:
    """Decode throughput and time to first token per method, at suite level."""
    figures = []
    by_suite: dict[tuple[Any, ...], list[ComparisonRow]] = {}
    for row in suite_level_rows(comparison):
        by_suite.setdefault((row.model, row.dtype, row.suite), []).append(row)
    for rows in by_suite.values():
        if rows[0].suite == BENCH_SUITE:
            figures.extend(tok_s_vs_batch(rows, colors))
            continue
        several_runs = len({r.run for r in rows}) > 1
        first = rows[0]
        scope = "suite average" if first.task == "AVG" else f"task {first.task}"
        caption = f"{_group_caption(first)} · {scope}"
        for key, label, unit in (("decode_tok_s", "decode tok/s", "tok/s"), ("ttft_ms", "TTFT", "ms")):
            title = f"{label} — {first.suite}"
            bars = [
                (r.method + (f" ({r.run})" if several_runs else ""), getattr(r, key),
                 colors.get(r.quant_type, PALETTE[0]))
                for r in rows
            ]
            if all(value is None for _, value, _ in bars):
                figures.append(Figure(title, caption, missing=f"{label} not measured"))
            else:
                figures.append(Figure(title, caption, svg=hbar_chart(title, bars, unit)))
    return figures


def tok_s_vs_batch(rows: list[ComparisonRow], colors: dict[str | None, str]) -> list[Figure]:
    """`bench` runs: decode tok/s against batch size, a line per method, a chart per context length."""
    by_context: dict[int, list[tuple[int, ComparisonRow]]] = {}
    for row in rows:
        cell = parse_bench_task(row.task)
        if cell is not None and cell[0] is not None:
            by_context.setdefault(cell[1], []).append((cell[0], row))
    figures = []
    for context, cells in sorted(by_context.items()):
        several_runs = len({r.run for _, r in cells}) > 1
        title = f"decode tok/s vs batch — {context} tokens"
        batches = sorted({b for b, _ in cells})
        series: dict[str, Series] = {}
        for batch, row in sorted(cells, key=lambda c: c[0]):
            if row.decode_tok_s is not None:  # an out-of-memory cell has no point
                label = _series_label(row, several_runs)
                item = series.setdefault(label, Series(label, colors.get(row.quant_type, PALETTE[0])))
                tip = f"{row.quant_type} at batch {batch}: {row.decode_tok_s:.1f} tok/s"
                item.points.append((float(batches.index(batch)), float(row.decode_tok_s), tip))
        caption = _group_caption(cells[0][1])
        if not series:
            figures.append(Figure(title, caption, missing="decode tok/s not measured (every cell ran out of memory)"))
            continue
        x = category_axis("batch size", [str(b) for b in batches])
        y = numeric_axis("decode tok/s", [p[1] for s in series.values() for p in s.points], include_zero=True)
        figures.append(Figure(title, caption, svg=xy_chart(title, list(series.values()), x, y)))
    return figures


def _sort_key(value: Any) -> tuple[int, float, str]:
    return (0, float(value), "") if _is_number(value) else (1, 0.0, str(value))


def _axis_text(value: Any) -> str:
    return fmt_num(float(value)) if _is_number(value) else str(value)


def passkey_heatmaps(run: Run, digest: SampleDigest, baseline: str) -> list[Figure]:
    """Retrieval accuracy by needle depth x context length, one map per method/budget."""
    figures = []
    model = run.config.get("model", "model not recorded")
    keys = sorted(digest.passkey, key=lambda k: (k[0] != baseline, str(k[0]), cache_size_key(k[1]), k[2]))
    several_protocols = len({k[2] for k in keys}) > 1
    for quant_type, cache_size, protocol in keys:
        cells = digest.passkey[(quant_type, cache_size, protocol)]
        depths = sorted({d for d, _ in cells}, key=_sort_key)
        lengths = sorted({c for _, c in cells}, key=_sort_key)
        grid = []
        for depth in depths:
            line = []
            for length in lengths:
                scores = cells.get((depth, length), [])
                mean = sum(scores) / len(scores) if scores else None
                tip = (f"depth {_axis_text(depth)}, context {_axis_text(length)}: "
                       + (f"{100 * mean:.0f}% of {len(scores)} samples" if mean is not None else "no score"))
                line.append((mean, tip))
            grid.append(line)
        label = quant_type if quant_type == baseline else f"{quant_type}@{format_cache_size(cache_size)}"
        label += f" · {protocol}" if several_protocols else ""
        title = f"passkey — {label}"
        svg = heatmap(title, [_axis_text(d) for d in depths], [_axis_text(c) for c in lengths],
                      grid, "context length (tokens)", "needle depth")
        figures.append(Figure(title, f"run {run.name} · model {model}", svg=svg))
    return figures


def layer_figures(run: Run) -> list[Figure]:
    """Per-layer OQ ratio and original/quantized/evicted fractions of ARKV (mix) runs."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in run.layer_stats:
        if row.get("quant_type") in LAYER_METHODS:
            key = (row.get("task"), row.get("quant_type"), row.get("cache_size"))
            groups.setdefault(key, []).append(row)
    figures = []
    ordered = sorted(groups, key=lambda k: (str(k[0]), str(k[1]), cache_size_key(k[2])))
    for task, quant_type, cache_size in ordered:
        rows = sorted(groups[(task, quant_type, cache_size)], key=lambda r: _sort_key(r.get("layer")))
        layers = [_axis_text(r.get("layer")) for r in rows]
        name = f"{task} — {quant_type}@{format_cache_size(cache_size)}"
        caption = f"run {run.name}"
        figures.append(_oq_ratio_figure(name, caption, layers, rows))
        figures.append(_fractions_figure(name, caption, layers, rows))
    return figures


def _oq_ratio_figure(name: str, caption: str, layers: list[str], rows: list[dict[str, Any]]) -> Figure:
    title = f"OQ ratio per layer: {name}"
    points = [(float(i), float(r["oq_ratio"]), f"layer {layers[i]}: OQ ratio {fmt_num(r['oq_ratio'])}")
              for i, r in enumerate(rows) if _is_number(r.get("oq_ratio"))]
    if not points:
        return Figure(title, caption, missing="OQ ratio not measured")
    x = category_axis("layer", layers)
    if len(layers) > 16:
        x.ticks = x.ticks[:: -(-len(layers) // 16)]
    y = numeric_axis("OQ ratio", [p[1] for p in points], include_zero=True)
    return Figure(title, caption, svg=xy_chart(title, [Series("OQ ratio", "#9467bd", points)], x, y))


def _fractions_figure(name: str, caption: str, layers: list[str], rows: list[dict[str, Any]]) -> Figure:
    title = f"Cache composition per layer: {name}"
    stacks = [(label, color, [r.get(key) if _is_number(r.get(key)) else None for r in rows])
              for key, label, color in FRACTION_STACKS]
    if all(v is None for _, _, values in stacks for v in values):
        return Figure(title, caption, missing="per-layer fractions not measured")
    svg = stacked_columns(title, layers, stacks, "layer", "fraction of tokens")
    return Figure(title, caption, svg=svg)
