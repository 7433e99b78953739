"""compare(): ratios against the right full-cache row, worked out by hand from fixtures."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from rich.console import Console

from arkv_bench.compare import AVG_TASK, ComparisonRow, compare, render_table
from arkv_bench.results_io import find_runs
from fixtures_runs import LLAMA, QWEN, build_fixture_results, summary_row, write_run


@pytest.fixture
def comparison(tmp_path: Path):
    return compare(find_runs([build_fixture_results(tmp_path)]))


def pick(rows: list[ComparisonRow], **where) -> ComparisonRow:
    matches = [r for r in rows if all(getattr(r, k) == v for k, v in where.items())]
    assert len(matches) == 1, f"{where}: {len(matches)} rows"
    return matches[0]


# ------------------------------------------------------------------------- results_io


def test_find_runs_discovers_nested_folders_and_parses_numbers(tmp_path: Path) -> None:
    results = build_fixture_results(tmp_path)
    runs = find_runs([results])
    assert [r.name for r in runs] == ["llama-longbench", "llama-passkey", "qwen-gsm8k"]
    passkey = runs[1]
    full = next(r for r in passkey.summary if r["quant_type"] == "full")
    assert full["cache_size"] == "full"
    assert full["n"] == 6 and isinstance(full["n"], int)
    assert full["decode_tok_s"] is None  # empty cell = not measured, never 0
    assert full["peak_mem_bytes"] is None
    assert passkey.config["device"] == "cpu"
    assert passkey.provenance["git_commit"] == "0123abc"
    assert len(list(passkey.iter_samples())) == 18
    assert passkey.layer_stats[0]["oq_ratio"] is None


def test_find_runs_accepts_a_run_folder_and_dedups(tmp_path: Path) -> None:
    results = build_fixture_results(tmp_path)
    runs = find_runs([results / "qwen-gsm8k", results])
    assert [r.name for r in runs].count("qwen-gsm8k") == 1
    assert len(runs) == 3


def test_find_runs_missing_path_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as error:
        find_runs([tmp_path / "nope"])
    assert "nope" in str(error.value) and "\n" not in str(error.value)


def test_fraction_cache_size_and_truncated_sample_line(tmp_path: Path) -> None:
    folder = write_run(tmp_path, "frac", config={}, summary=[
        summary_row(LLAMA, "gsm8k", "gsm8k", "mix", 0.2, score=10.0)])
    with (folder / "samples.jsonl").open("w") as handle:
        handle.write(json.dumps({"task": "gsm8k", "sample_id": 1}) + "\n" + '{"task": "gsm8k", "sam')
    (run,) = find_runs([folder])
    assert run.summary[0]["cache_size"] == 0.2
    assert [s["sample_id"] for s in run.iter_samples()] == [1]


# ------------------------------------------------------------------------- ratios


def test_hand_computed_ratios(comparison) -> None:
    row = pick(comparison.rows, task="qasper", quant_type="mix", cache_size=256)
    assert row.baseline_score == 40.0
    assert row.score_pct_of_baseline == pytest.approx(90.0)  # 36 / 40
    assert row.kv_ratio_vs_baseline == pytest.approx(0.25)  # 250 / 1000
    assert row.decode_tok_s_ratio == pytest.approx(0.9)  # 45 / 50
    assert row.peak_mem_ratio == pytest.approx(0.75)  # 3000 / 4000
    assert row.compressed_frac == pytest.approx(0.8)
    h2o = pick(comparison.rows, task="hotpotqa", quant_type="h2o", cache_size=256)
    assert h2o.score_pct_of_baseline == pytest.approx(50.0)  # 25 / 50
    assert h2o.peak_mem_ratio == pytest.approx(1.1)  # 6600 / 6000


def test_baseline_row_is_its_own_reference(comparison) -> None:
    full = pick(comparison.rows, task="qasper", quant_type="full")
    assert full.is_baseline
    assert full.score_pct_of_baseline == pytest.approx(100.0)
    assert full.kv_ratio_vs_baseline == pytest.approx(1.0)


def test_suite_average_is_mean_of_task_scores(comparison) -> None:
    avg = pick(comparison.rows, suite="longbench", task=AVG_TASK, quant_type="mix", cache_size=256)
    assert avg.score == pytest.approx(40.5)  # (36 + 45) / 2
    assert avg.baseline_score == pytest.approx(45.0)  # (40 + 50) / 2
    assert avg.score_pct_of_baseline == pytest.approx(90.0)
    assert avg.kv_ratio_vs_baseline == pytest.approx(325 / 1500)
    assert avg.decode_tok_s_ratio == pytest.approx(37.5 / 45)
    assert avg.peak_mem_ratio == pytest.approx(3900 / 5000)
    assert avg.n == 20
    assert avg.score_ci95 is None  # not derivable from per-task intervals; never guessed
    h2o = pick(comparison.rows, suite="longbench", task=AVG_TASK, quant_type="h2o", cache_size=256)
    assert h2o.score_pct_of_baseline == pytest.approx(100 * 27.5 / 45)


def test_one_task_suites_get_no_average_row(comparison) -> None:
    assert not [r for r in comparison.rows if r.suite in ("passkey", "gsm8k") and r.task == AVG_TASK]


def test_passkey_on_cpu_leaves_memory_and_speed_ratios_empty(comparison) -> None:
    mix = pick(comparison.rows, suite="passkey", quant_type="mix")
    assert mix.score_pct_of_baseline == pytest.approx(100 * (5 / 6))
    assert mix.kv_ratio_vs_baseline == pytest.approx(768 / 4096)
    assert mix.peak_mem_ratio is None and mix.decode_tok_s_ratio is None


def test_missing_baseline_leaves_ratios_empty_with_a_note(comparison) -> None:
    for row in (r for r in comparison.rows if r.model == QWEN):
        assert row.score_pct_of_baseline is None
        assert row.kv_ratio_vs_baseline is None
        assert row.decode_tok_s_ratio is None
        assert row.peak_mem_ratio is None
        assert row.score == pytest.approx(30.0 if row.quant_type == "mix" else 28.0)
    assert any(f"no `full` baseline for model {QWEN} suite gsm8k" in n for n in comparison.notes)
    assert len(comparison.notes) == 1


def test_models_and_dtypes_never_share_a_baseline(tmp_path: Path) -> None:
    write_run(tmp_path, "llama", config={}, summary=[
        summary_row(LLAMA, "gsm8k", "gsm8k", "full", "full", score=50.0, kv_bytes=1000),
        summary_row(LLAMA, "gsm8k", "gsm8k", "mix", 512, score=40.0, kv_bytes=250),
        summary_row(LLAMA, "gsm8k", "gsm8k", "mix", 512, score=41.0, kv_bytes=260, dtype="float16"),
    ])
    write_run(tmp_path, "qwen", config={}, summary=[
        summary_row(QWEN, "gsm8k", "gsm8k", "mix", 512, score=30.0, kv_bytes=100)])
    result = compare(find_runs([tmp_path]))
    llama = pick(result.rows, model=LLAMA, quant_type="mix", dtype="bfloat16")
    assert llama.score_pct_of_baseline == pytest.approx(80.0)
    assert pick(result.rows, model=LLAMA, dtype="float16").score_pct_of_baseline is None
    assert pick(result.rows, model=QWEN).kv_ratio_vs_baseline is None
    assert f"no `full` baseline for model {QWEN} suite gsm8k (dtype bfloat16)" in result.notes
    assert f"no `full` baseline for model {LLAMA} suite gsm8k (dtype float16)" in result.notes


def test_baseline_prefers_same_cache_size_else_any(tmp_path: Path) -> None:
    write_run(tmp_path, "base", config={}, summary=[
        summary_row(LLAMA, "gsm8k", "gsm8k", "full", 256, score=40.0, kv_bytes=1000),
        summary_row(LLAMA, "gsm8k", "gsm8k", "full", 512, score=50.0, kv_bytes=2000),
    ])
    write_run(tmp_path, "methods", config={}, summary=[
        summary_row(LLAMA, "gsm8k", "gsm8k", "mix", 512, score=45.0, kv_bytes=500),
        summary_row(LLAMA, "gsm8k", "gsm8k", "mix", 1024, score=48.0, kv_bytes=800),
    ])
    result = compare(find_runs([tmp_path]))
    same = pick(result.rows, quant_type="mix", cache_size=512)
    assert same.baseline_score == 50.0 and same.kv_ratio_vs_baseline == pytest.approx(0.25)
    other = pick(result.rows, quant_type="mix", cache_size=1024)
    assert other.baseline_score in (40.0, 50.0)  # any full row; the baseline ignores budget
    assert not result.notes


def test_average_needs_every_task(tmp_path: Path) -> None:
    write_run(tmp_path, "lb", config={}, summary=[
        summary_row(LLAMA, "longbench", "qasper", "full", "full", score=40.0),
        summary_row(LLAMA, "longbench", "hotpotqa", "full", "full", score=50.0),
        summary_row(LLAMA, "longbench", "qasper", "mix", 256, score=36.0),
    ])
    result = compare(find_runs([tmp_path]))
    avg = pick(result.rows, task=AVG_TASK, quant_type="mix")
    assert avg.score is None and avg.score_pct_of_baseline is None
    assert any("hotpotqa" in note for note in result.notes)


def test_suite_and_model_filters(tmp_path: Path) -> None:
    runs = find_runs([build_fixture_results(tmp_path)])
    assert {r.suite for r in compare(runs, suite="passkey").rows} == {"passkey"}
    assert {r.model for r in compare(runs, model=QWEN).rows} == {QWEN}


# ------------------------------------------------------------------------- writers


def test_csv_leaves_unmeasured_cells_empty(comparison, tmp_path: Path) -> None:
    path = comparison.to_csv(tmp_path / "out" / "comparison.csv")
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == len(comparison.rows)
    qwen = next(r for r in rows if r["model"] == QWEN)
    assert qwen["score_pct_of_baseline"] == "" and qwen["kv_ratio_vs_baseline"] == ""
    mix = next(r for r in rows if r["task"] == "qasper" and r["quant_type"] == "mix" and r["cache_size"] == "256")
    assert float(mix["kv_ratio_vs_baseline"]) == pytest.approx(0.25)


def test_json_uses_null_for_unmeasured(comparison) -> None:
    payload = json.loads(comparison.to_json())
    assert payload["baseline"] == "full" and payload["notes"] == comparison.notes
    qwen = next(r for r in payload["rows"] if r["model"] == QWEN)
    assert qwen["score_pct_of_baseline"] is None


def test_markdown_marks_best_and_shows_dash(comparison) -> None:
    text = comparison.to_markdown()
    assert "| — |" in text
    assert "**55.0**" in text  # fastest decode on qasper: h2o@256
    assert "> no `full` baseline" in text


def test_render_table_highlights_best_per_task(comparison) -> None:
    table = render_table(comparison)
    headers = [str(c.header) for c in table.columns]
    rows = comparison.rows
    kv_cells = list(table.columns[headers.index("KV ratio")].cells)
    best_kv = [rows[i].method for i, cell in enumerate(kv_cells)
               if "bold green" in str(cell) and rows[i].task == "qasper"]
    assert best_kv == ["h2o@256"]  # lowest KV ratio on qasper (0.2)
    score_cells = list(table.columns[headers.index("Score")].cells)
    best_score = [rows[i].method for i, cell in enumerate(score_cells)
                  if "bold green" in str(cell) and rows[i].task == "hotpotqa"]
    assert best_score == ["full"]
    console = Console(record=True, width=250)
    console.print(table)
    assert "—" in console.export_text()
