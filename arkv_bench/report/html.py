"""Assemble the single-file HTML report.

The file must stand alone (no network request of any kind) and must show data, never run
it: predictions, references, task and model names all come from models, data sets and
files, so every one of them goes through `esc` before it reaches the page.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from arkv_bench.compare import (
    AVG_TASK,
    Comparison,
    ComparisonRow,
    best_cells,
    compare,
    display_columns,
    format_cache_size,
)
from arkv_bench.report.figures import (
    Figure,
    SampleDigest,
    digest_samples,
    layer_figures,
    method_colors,
    passkey_heatmaps,
    score_vs_cache,
    score_vs_memory,
    speed_figures,
)
from arkv_bench.report.static import CSS, JS
from arkv_bench.report.svg import esc
from arkv_bench.results_io import Run, atomic_write, check_writable_file, find_runs

SECTIONS = (
    ("comparison", "Comparison"),
    ("score-vs-cache", "Score vs cache size"),
    ("pareto", "Score vs KV memory"),
    ("speed", "Speed"),
    ("passkey-heatmap", "Passkey depth × length"),
    ("layer-stats", "ARKV per layer"),
    ("samples", "Samples"),
    ("provenance", "Provenance"),
)
PREDICTION_LIMIT = 4000  # characters shown per prediction/reference; the rest is noted


def write_report(
    paths: list[Path],
    out: Path,
    *,
    samples_per_task: int = 20,
    baseline: str = "full",
    title: str = "arkv-bench report",
) -> Path:
    """Write one self-contained HTML report of every run under `paths`; return its path.

    `out` may be a file name or an existing folder (then `report.html` inside it).
    """
    target = Path(out)
    if target.is_dir():
        target = target / "report.html"
    check_writable_file(target, "--out")
    runs = find_runs(paths)
    comparison = compare(runs, baseline=baseline)
    return atomic_write(target, render_report(runs, comparison, samples_per_task, title))


def render_report(runs: list[Run], comparison: Comparison, samples_per_task: int, title: str) -> str:
    """The whole HTML document as a string."""
    digests = {run.name: digest_samples(run, samples_per_task) for run in runs}
    labels = [r.quant_type for r in comparison.rows] + [
        key[0] for d in digests.values() for key in d.passkey
    ]
    colors = method_colors(labels, comparison.baseline)
    bodies = {
        "comparison": _comparison_section(comparison),
        "score-vs-cache": _figure_grid("score-vs-cache", score_vs_cache(comparison, colors)),
        "pareto": _figure_grid("pareto", score_vs_memory(comparison, colors)),
        "speed": _figure_grid("speed", speed_figures(comparison, colors)),
        "passkey-heatmap": _figure_grid(
            "passkey-heatmap",
            [f for run in runs for f in passkey_heatmaps(run, digests[run.name], comparison.baseline)],
        ),
        "layer-stats": _figure_grid("layer-stats", [f for run in runs for f in layer_figures(run)]),
        "samples": _samples_section(runs, digests, samples_per_task),
        "provenance": _provenance_section(runs),
    }
    sections = "\n".join(
        f'<section id="{key}"><h2>{esc(heading)}</h2>\n{bodies[key]}\n</section>'
        for key, heading in SECTIONS
    )
    nav = " ".join(f'<a href="#{key}">{esc(heading)}</a>' for key, heading in SECTIONS)
    run_names = ", ".join(run.name for run in runs) or "none"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<style>{CSS}</style>
</head>
<body>
<header>
<h1>{esc(title)}</h1>
<p class="meta">{len(runs)} run(s): {esc(run_names)} · baseline <code>{esc(comparison.baseline)}</code></p>
<nav>{nav}</nav>
</header>
<main>
{sections}
</main>
<script>{JS}</script>
</body>
</html>
"""


def _na(text: str) -> str:
    return f'<p class="na">{esc(text)}</p>'


def _figure_grid(section: str, figures: list[Figure]) -> str:
    """Figures side by side; ids are `<section>-<n>` so tests and links can find them."""
    if not figures:
        return _na("no data")
    items = []
    for index, figure in enumerate(figures, start=1):
        fig_id = f"{section}-{index}"
        caption = f"<figcaption>{esc(figure.caption)}</figcaption>"
        if figure.svg is None:
            items.append(
                f'<figure id="{fig_id}" class="missing"><h3>{esc(figure.title)}</h3>'
                f"{_na(figure.missing or 'not measured')}{caption}</figure>"
            )
        else:
            items.append(f'<figure id="{fig_id}">{figure.svg}{caption}</figure>')
    return '<div class="figs">\n' + "\n".join(items) + "\n</div>"


# --------------------------------------------------------------------------- comparison


def _sort_value(row: ComparisonRow, key: str) -> str:
    """Raw value for the client-side sort: numbers unformatted, '' when not measured."""
    value = getattr(row, key)
    if value is None:
        return ""
    if key == "cache_size" and not isinstance(value, (int, float)):
        return "Infinity"  # 'full' sorts after every finite budget
    return str(value)


def comparison_table(comparison: Comparison) -> str:
    """The comparison as a sortable HTML table, best value per column marked."""
    columns = display_columns(comparison.rows)
    best = best_cells(comparison.rows, columns)
    head = "".join(f'<th scope="col" data-key="{esc(c.key)}">{esc(c.header)}</th>' for c in columns)
    lines = []
    for index, row in enumerate(comparison.rows):
        classes = " ".join(
            name for name, on in (("baseline", row.is_baseline), ("avg", row.task == AVG_TASK)) if on
        )
        cells = []
        for col in columns:
            css = " ".join(
                name for name, on in (("num", col.numeric), ("best", (index, col.key) in best)) if on
            )
            cells.append(
                f'<td class="{css}" data-v="{esc(_sort_value(row, col.key))}">'
                f"{esc(col.format(getattr(row, col.key)))}</td>"
            )
        lines.append(f'<tr class="{classes}">' + "".join(cells) + "</tr>")
    return (
        '<div class="table-wrap"><table id="comparison-table" class="sortable">'
        f"<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(lines) + "\n</tbody></table></div>"
    )


def _comparison_section(comparison: Comparison) -> str:
    if not comparison.rows:
        return _na("no data: no summary.csv rows found")
    parts = [
        f"<p>Ratios are against the <code>{esc(comparison.baseline)}</code> row of the same model, "
        "dtype, suite and task. Best value per column within each task in green. "
        "Click a header to sort.</p>",
        comparison_table(comparison),
    ]
    if comparison.notes:
        items = "".join(f"<li>{esc(note)}</li>" for note in comparison.notes)
        parts.append(f'<h3>Notes</h3><ul class="notes" id="comparison-notes">{items}</ul>')
    return "\n".join(parts)


# --------------------------------------------------------------------------- samples


def _clip(text: str) -> str:
    if len(text) <= PREDICTION_LIMIT:
        return esc(text)
    hidden = len(text) - PREDICTION_LIMIT
    return esc(text[:PREDICTION_LIMIT]) + f'<span class="na"> … ({hidden} more characters)</span>'


def _score_text(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.3g}"
    return "—"


def _references(record: dict[str, Any]) -> str:
    refs = record.get("references")
    if refs is None:
        return _na("no references recorded")
    if not isinstance(refs, list):
        refs = [refs]
    return "<ul>" + "".join(f"<li><pre>{_clip(str(ref))}</pre></li>" for ref in refs) + "</ul>"


def _sample_block(sample_id: str, records: list[dict[str, Any]]) -> str:
    """One sample: its references once, then each method's prediction and score."""
    scores = [r["score"] for r in records if isinstance(r.get("score"), (int, float))]
    mean = f"mean score {sum(scores) / len(scores):.3g}" if scores else "no score"
    rows = "".join(
        "<tr>"
        f"<td>{esc(r.get('quant_type'))}</td><td>{esc(format_cache_size(r.get('cache_size')))}</td>"
        f"<td>{esc(r.get('status', '—'))}</td><td class=\"num\">{_score_text(r.get('score'))}</td>"
        f"<td><pre>{_clip(str(r.get('prediction', '')))}</pre></td>"
        "</tr>"
        for r in records
    )
    return (
        f"<details class=\"sample\"><summary>sample {esc(sample_id)} · {mean}</summary>"
        f"<h3>References</h3>{_references(records[0])}"
        "<table><thead><tr><th>Method</th><th>Cache</th><th>Status</th><th>Score</th>"
        f"<th>Prediction</th></tr></thead><tbody>{rows}</tbody></table></details>"
    )


def _samples_section(runs: list[Run], digests: dict[str, SampleDigest], per_task: int) -> str:
    blocks = []
    for run in runs:
        for (suite, task), samples in digests[run.name].browser.items():
            inner = "".join(_sample_block(sid, records) for sid, records in samples.items())
            blocks.append(
                f'<details class="task"><summary>{esc(run.name)} · {esc(suite)} / {esc(task)} — '
                f"first {len(samples)} sample(s)</summary>{inner}</details>"
            )
    if not blocks:
        return _na("no data: no samples.jsonl records")
    return f"<p>First {per_task} samples per task, every method and cache size.</p>" + "".join(blocks)


# --------------------------------------------------------------------------- provenance


def _config_value(run: Run, key: str) -> Any:
    if key.startswith("provenance."):
        return run.provenance.get(key.split(".", 1)[1])
    return run.config.get(key)


PROVENANCE_FIELDS = (
    ("Model", "model"),
    ("Suite", "suite"),
    ("Tasks", "tasks"),
    ("Methods", "quant_types"),
    ("Cache sizes", "cache_sizes"),
    ("Dtype", "dtype"),
    ("Attention", "attn_implementation"),
    ("Chat template", "chat_template"),
    ("Device", "device"),
    ("Device name", "provenance.device_name"),
    ("arkv-bench", "provenance.arkv_bench"),
    ("torch", "provenance.torch"),
    ("transformers", "provenance.transformers"),
    ("Python", "provenance.python"),
    ("Git commit", "provenance.git_commit"),
    ("Date", "provenance.date"),
    ("Limit", "limit"),
    ("Seed", "seed"),
)


def _provenance_cell(value: Any) -> str:
    if value is None or value == "" or value == []:
        return '<span class="na">not recorded</span>'
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return esc(", ".join(str(v) for v in value))
    return esc(value)


def _provenance_section(runs: Iterable[Run]) -> str:
    runs = list(runs)
    if not runs:
        return _na("no data")
    head = "<th></th>" + "".join(f'<th scope="col">{esc(run.name)}</th>' for run in runs)
    rows = "".join(
        f'<tr><th scope="row">{esc(label)}</th>'
        + "".join(f"<td>{_provenance_cell(_config_value(run, key))}</td>" for run in runs)
        + "</tr>"
        for label, key in PROVENANCE_FIELDS
    )
    return (
        '<div class="table-wrap"><table id="provenance-table">'
        f"<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>"
    )
