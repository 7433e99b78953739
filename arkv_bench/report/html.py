"""Assemble the single-file HTML report from templates/report.html.

The file must stand alone (no network request of any kind) and must show data, never run
it: predictions, references, task and model names all come from models, data sets and
files, so the template is rendered with Jinja2's autoescape and only our own CSS, JS and the
SVG figures (svg.py escapes their labels) are passed as trusted markup.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jinja2
import markupsafe

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
    ("score-vs-cache", "Score vs cache size (a line per method and protocol)"),
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
    """The whole HTML document as a string (templates/report.html, escaped by Jinja2's autoescape)."""
    digests = {run.name: digest_samples(run, samples_per_task) for run in runs}
    labels = [r.quant_type for r in comparison.rows] + [
        key[0] for d in digests.values() for key in d.passkey
    ]
    colors = method_colors(labels, comparison.baseline)
    grids = {
        "score-vs-cache": score_vs_cache(comparison, colors),
        "pareto": score_vs_memory(comparison, colors),
        "speed": speed_figures(comparison, colors),
        "passkey-heatmap": [f for run in runs for f in passkey_heatmaps(run, digests[run.name], comparison.baseline)],
        "layer-stats": [f for run in runs for f in layer_figures(run)],
    }
    return _TEMPLATES.get_template("report.html").render(
        title=title, css=CSS, js=JS, sections=SECTIONS, runs=runs, baseline=comparison.baseline,
        run_names=", ".join(run.name for run in runs) or "none", grids=grids, table=comparison_table(comparison),
        notes=comparison.notes, browser=_browser(runs, digests), per_task=samples_per_task,
        provenance=_provenance(runs), limit=PREDICTION_LIMIT)


def _text(value: Any) -> Any:
    """Every value the template prints, escaped as svg.esc does (which also breaks '://' so the file never holds a
    literal URL); trusted markup (the figures, our CSS and JS, macro output) passes as it is."""
    return value if isinstance(value, markupsafe.Markup) else markupsafe.Markup(esc(value))


_TEMPLATES = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                                autoescape=True, undefined=jinja2.StrictUndefined, finalize=_text)


# --------------------------------------------------------------------------- comparison


def _sort_value(row: ComparisonRow, key: str) -> str:
    """Raw value for the client-side sort: numbers unformatted, '' when not measured."""
    value = getattr(row, key)
    if value is None:
        return ""
    if key == "cache_size" and not isinstance(value, (int, float)):
        return "Infinity"  # 'full' sorts after every finite budget
    return str(value)


def comparison_table(comparison: Comparison) -> dict[str, Any]:
    """The comparison table's columns and cells (text, sort value, classes), the best value per column marked."""
    columns = display_columns(comparison.rows)
    best = best_cells(comparison.rows, columns)
    rows = []
    for index, row in enumerate(comparison.rows):
        flags = (("baseline", row.is_baseline), ("avg", row.task == AVG_TASK))
        cells = [{"css": " ".join(n for n, on in (("num", c.numeric), ("best", (index, c.key) in best)) if on),
                  "sort": _sort_value(row, c.key), "text": c.format(getattr(row, c.key))} for c in columns]
        rows.append({"css": " ".join(name for name, on in flags if on), "cells": cells})
    return {"columns": columns, "rows": rows}


# --------------------------------------------------------------------------- samples


def _score_text(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.3g}"
    return "—"


def _sample(sample_id: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """One sample: its references once, then each method's prediction and score."""
    scores = [r["score"] for r in records if isinstance(r.get("score"), (int, float))]
    refs = records[0].get("references")
    return {"id": sample_id, "mean": f"mean score {sum(scores) / len(scores):.3g}" if scores else "no score",
            "references": None if refs is None else [str(ref) for ref in (refs if isinstance(refs, list) else [refs])],
            "rows": [{"method": str(r.get("quant_type")) + (f" · {r['protocol']}" if r.get("protocol") not in
                                                                (None, "query-aware") else ""),
                      "cache": format_cache_size(r.get("cache_size")),
                      "status": r.get("status", "—"), "score": _score_text(r.get("score")),
                      "prediction": str(r.get("prediction", ""))} for r in records]}


def _browser(runs: list[Run], digests: dict[str, SampleDigest]) -> list[tuple[str, Any, Any, list[dict[str, Any]]]]:
    return [(run.name, suite, task, [_sample(sid, records) for sid, records in samples.items()])
            for run in runs for (suite, task), samples in digests[run.name].browser.items()]


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


def _provenance_text(value: Any) -> str | None:
    """A provenance value as text; None when it was not recorded."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def _provenance(runs: Iterable[Run]) -> list[tuple[str, list[str | None]]]:
    return [(label, [_provenance_text(_config_value(run, key)) for run in runs]) for label, key in PROVENANCE_FIELDS]
