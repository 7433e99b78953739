"""`arkv-bench bench` on a tiny random Llama on CPU: rows, ratios, empty GPU-only figures, the results
folder read by compare and report, and bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from arkv_bench.bench import BASELINES, BOUNDED, RATIO_FIGURES, largest_fitting
from arkv_bench.cache import METHODS
from arkv_bench.cli import app
from arkv_bench.compare import compare
from arkv_bench.results import SUMMARY_COLUMNS
from arkv_bench.results_io import find_runs

runner = CliRunner()
CONTEXT, NEW_TOKENS, BATCHES = 48, 3, (1, 2)
ARGS = ["--random-arch", "tiny-llama", "--quant-type", "full,full-static,mix,window", "--batch-size", "1,2",
        "--context-lengths", str(CONTEXT), "--cache-size", "24", "--window-size", "4",
        "--new-tokens", str(NEW_TOKENS), "--device", "cpu"]
GPU_ONLY = ("peak_bytes", "peak_above_weights_bytes", "ideal_step_ms", "step_over_ideal")


def bench(*args: str) -> object:
    return runner.invoke(app, ["bench", *args], catch_exceptions=False)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    result = bench(*ARGS, "--out", str(out), "--run-name", "tiny")
    assert result.exit_code == 0, result.output
    return out / "tiny"


def test_a_row_per_method_and_batch_with_every_token_decoded(folder: Path) -> None:
    rows = read_csv(folder / "bench.csv")
    methods = [b for b in BASELINES if b in METHODS] + [BOUNDED, "mix", "window"]
    assert [(r["method"], int(r["batch_size"])) for r in rows] == [(m, b) for b in BATCHES for m in methods]
    for r in rows:
        assert r["status"] == "ok" and int(r["context_length"]) == CONTEXT
        assert int(r["decode_steps"]) == NEW_TOKENS - 1  # EOS ignored: every method decodes alike
        assert float(r["decode_tok_s"]) > 0 and float(r["prefill_ms"]) > 0
        assert float(r["steady_tok_s"]) == pytest.approx(int(r["batch_size"]) * 1000 / float(r["step_ms_p50"]))
        # K and V of 2 layers x 2 KV heads x 16 dims in fp32, for every token the cache saw (the last one is not fed);
        # the bounded baseline saw only the prompt's last cache_size (24) tokens
        seen = (24 if r["method"] == BOUNDED else CONTEXT) + NEW_TOKENS - 1
        assert int(r["kv_bytes_full"]) == 2 * 2 * 2 * 16 * 4 * seen * int(r["batch_size"])
        compressed = r["method"] in ("mix", "window")
        assert (int(r["kv_bytes"]) < int(r["kv_bytes_full"])) == compressed


def test_ratios_are_the_division_of_the_measured_columns(folder: Path) -> None:
    rows = read_csv(folder / "bench.csv")
    for batch in BATCHES:
        cell = {r["method"]: r for r in rows if int(r["batch_size"]) == batch}
        full = cell["full"]
        static = cell.get("full-static")
        bounded = cell.get(BOUNDED)
        best = max([full] + ([static] if static else []), key=lambda r: float(r["decode_tok_s"]))
        for r in cell.values():
            assert r["best_full"] == best["method"]
            for figure in RATIO_FIGURES:
                for suffix, base in (("full", full), ("full_static", static), ("best_full", best),
                                     ("bounded_static", bounded)):
                    value = r[f"{figure}_x_{suffix}"]
                    if base is None or not r[figure]:  # not measured (full-static absent, or a GPU-only figure)
                        assert value == ""
                    else:
                        assert float(value) == pytest.approx(float(r[figure]) / float(base[figure]), rel=1e-12)


def test_gpu_only_figures_are_empty_on_cpu(folder: Path) -> None:
    for r in read_csv(folder / "bench.csv"):
        assert all(r[key] == "" for key in GPU_ONLY)
        assert r["peak_above_weights_bytes_x_full"] == ""
        assert int(r["weights_bytes"]) > int(r["read_bytes_per_step"]) - int(r["kv_bytes"])  # untied embedding
    assert all(r["peak_mem_bytes"] == "" for r in read_csv(folder / "summary.csv"))
    config = json.loads((folder / "config.json").read_text())
    assert config["hbm_copy_bytes_per_s"] is None
    assert config["provenance"]["gpus"]["count"] == 0


def test_config_records_what_was_used(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    assert config["suite"] == "bench" and config["compile"] is False  # CPU: eager unless asked
    assert isinstance(config["prefill_chunk"], int) or config["prefill_chunk"] is None
    assert config["batch_sizes"] == list(BATCHES) and config["context_lengths"] == [CONTEXT]
    assert config["attention_kernel"] == "auto" and config["attention_kernel_used"] == "torch"  # on the CPU
    assert {"git_commit", "torch", "transformers", "device_name"} <= set(config["provenance"])
    if "full-static" not in METHODS:
        assert any("full-static" in note for note in config["notes"])


def test_summary_is_the_usual_layout_and_compare_and_report_read_it(folder: Path, tmp_path: Path) -> None:
    summary = read_csv(folder / "summary.csv")
    assert list(summary[0]) == SUMMARY_COLUMNS
    assert {(r["suite"], r["task"], r["n"]) for r in summary} == {("bench", f"b{b} x {CONTEXT}", str(b)) for b in BATCHES}
    ratios = {(r["method"], r["batch_size"]): float(r["decode_tok_s_x_full"]) for r in read_csv(folder / "bench.csv")}
    comparison = compare(find_runs([folder]))
    assert comparison.rows and all(row.task != "AVG" for row in comparison.rows)  # cells are not averaged
    for row in comparison.rows:
        assert row.decode_tok_s_ratio == pytest.approx(ratios[(row.quant_type, str(row.n))], rel=1e-12)
    shown = runner.invoke(app, ["compare", str(folder), "--out", str(tmp_path / "c.csv")], catch_exceptions=False)
    assert shown.exit_code == 0, shown.output
    report = tmp_path / "report.html"
    made = runner.invoke(app, ["report", str(folder), "--out", str(report)], catch_exceptions=False)
    assert made.exit_code == 0, made.output
    assert f"decode tok/s vs batch — {CONTEXT} tokens" in report.read_text()


def test_another_runs_folder_is_refused(folder: Path) -> None:
    result = bench(*ARGS[:-2], "--device", "cpu", "--new-tokens", "4", "--out", str(folder.parent), "--run-name", "tiny")
    assert result.exit_code == 2 and "different run" in result.output


@pytest.mark.parametrize("change, words", [
    (["--random-arch", "llama-9"], "unknown --random-arch"),
    (["--quant-type", "full,nope"], "unknown method 'nope'"),
    (["--quant-type", "mix:nope=1"], "KEY=VALUE"),
    (["--batch-size", "0"], "--batch-size takes whole numbers >= 1"),
    (["--context-lengths", "0"], "--context-lengths takes whole numbers >= 1"),
    (["--context-lengths=-8"], "--context-lengths takes whole numbers >= 1"),
    (["--cache-size", "4"], "cache_size must be an integer larger than window_size"),
    (["--new-tokens", "1"], "--new-tokens must be at least 2"),
    (["--context-lengths", "5000"], "tiny-llama takes 4096 positions"),
    (["--model", "smollm2-135m"], "not both"),
    (["--find-max-batch"], "--find-max-batch needs --device cuda"),
    (["--attention-kernel", "cuda"], "--attention-kernel must be one of auto, triton, torch"),
    (["--attention-kernel", "triton"], "the triton kernel runs on CUDA"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(change: list[str], words: str, tmp_path: Path) -> None:
    result = bench(*ARGS, *change, "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert words in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("limit, fit", [(1024, 0), (1024, 1), (1024, 5), (1024, 64), (1024, 700), (6, 6), (8, 8)])
def test_largest_fitting_doubles_then_bisects(limit: int, fit: int) -> None:
    tried: list[int] = []

    def fits(n: int) -> bool:
        tried.append(n)
        return n <= fit

    assert largest_fitting(fits, limit) == fit
    assert max(tried) <= limit and len(tried) == len(set(tried))  # never past the limit, never twice
    assert len(tried) <= 2 * limit.bit_length() + 1


def test_compile_and_prefill_chunk_reach_the_decode_loop_only_where_it_takes_them(monkeypatch: pytest.MonkeyPatch
                                                                                   ) -> None:
    import inspect

    import torch

    from arkv_bench import bench as bench_module
    from arkv_bench.bench import BenchOptions, generation_options

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    opts = BenchOptions(compile=None, prefill_chunk=512)
    params = inspect.signature(bench_module.greedy_generate).parameters
    kwargs, used, notes = generation_options(opts, cuda)
    assert set(kwargs) == {"compile", "prefill_chunk"} & set(params)
    if "prefill_chunk" not in params:
        assert used["prefill_chunk"] == 0 and any("prefill_chunk" in n for n in notes)

    def newer(model, ids, mask, cache, max_new_tokens, eos_ids=(), should_stop=None, compile=None, prefill_chunk=2048):
        raise AssertionError("only its signature is read")

    monkeypatch.setattr(bench_module, "greedy_generate", newer)
    assert generation_options(opts, cuda)[:2] == ({"compile": True, "prefill_chunk": 512},
                                                  {"compile": True, "prefill_chunk": 512})
    assert generation_options(BenchOptions(), cpu)[:2] == ({"compile": False}, {"compile": False, "prefill_chunk": 2048})
    assert generation_options(BenchOptions(compile=False), cuda)[1]["compile"] is False


def test_max_batch_measures_the_largest_batch_that_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The search tries batches with a cheap probe (prefill and one eager step), then measures only the largest
    that fit, as a cell of kind max-batch, stepping down while the measured run does not fit."""
    from arkv_bench.bench import Bench, BenchOptions, load_bench_model

    opts = BenchOptions(random_arch="tiny-llama", device="cpu", cache_size=24, window_size=4, new_tokens=NEW_TOKENS)
    model, _ = load_bench_model(opts)
    bench_ = Bench(model, opts, {}, None, 0, 0)
    tried: list[int] = []
    real_fits = Bench.fits

    def fits(self, spec: str, batch: int, context: int) -> bool:
        tried.append(batch)
        return batch <= 3 and real_fits(self, spec, batch, context)

    monkeypatch.setattr(Bench, "fits", fits)
    row = bench_.max_batch("mix", CONTEXT)
    assert tried == [1, 2, 4, 3]
    assert (row["kind"], row["batch_size"], row["status"], row["decode_steps"]) == ("max-batch", 3, "ok", NEW_TOKENS - 1)
    measured: list[int] = []

    def measure(self, spec: str, batch: int, context: int, kind: str = "cell") -> dict:
        measured.append(batch)
        return {"batch_size": batch, "status": "ok" if batch <= 2 else "oom"}

    monkeypatch.setattr(Bench, "measure", measure)
    assert bench_.max_batch("mix", CONTEXT) == {"batch_size": 2, "status": "ok"}  # probes fit 3, the measured run 2
    assert measured == [3, 2]
    monkeypatch.setattr(Bench, "fits", lambda self, spec, batch, context: False)
    measured.clear()
    assert bench_.max_batch("mix", CONTEXT) == {"batch_size": 1, "status": "ok"} and measured == [1]


def test_out_of_memory_gives_an_oom_row_and_other_errors_propagate(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    import arkv_bench.bench as bench_module
    from arkv_bench.bench import Bench, BenchOptions, load_bench_model

    opts = BenchOptions(random_arch="tiny-llama", device="cpu", cache_size=24, window_size=4, new_tokens=NEW_TOKENS)
    model, _ = load_bench_model(opts)
    bench_ = Bench(model, opts, {}, None, 0, 0)
    error: list[Exception] = [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")]

    def failing(*args: object, **kwargs: object) -> None:
        raise error[0]

    monkeypatch.setattr(bench_module, "greedy_generate", failing)
    row = bench_.measure("mix", 2, CONTEXT)
    assert row["status"] == "oom" and "decode_tok_s" not in row
    assert not bench_.fits("mix", 2, CONTEXT)
    error[0] = RuntimeError("shape mismatch")
    with pytest.raises(RuntimeError, match="shape mismatch"):
        bench_.measure("mix", 2, CONTEXT)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        bench_.fits("mix", 2, CONTEXT)
