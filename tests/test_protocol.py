"""Protocols (query-aware / query-agnostic), the ruler and ppl suites in the registry, their options,
and how compare / report show a protocol and a lower-is-better score.

Fast tests use the tiny random llama of conftest; the end-to-end runs use the embedded model with
generation cut to a few tokens (the short tasks of test_run)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from arkv_bench import protocols
from arkv_bench.cache import make_cache
from arkv_bench.cli import app
from arkv_bench.compare import best_cells, compare, display_columns
from arkv_bench.generation import greedy_generate
from arkv_bench.options import RunOptions, UsageError, build_options
from arkv_bench.report.figures import method_colors, pareto_front, score_vs_cache
from arkv_bench.results_io import find_runs
from arkv_bench.suites import base, get_suite, higher_is_better, suites
from arkv_bench.tasks import load_task_specs
from fixtures_runs import LLAMA, summary_row, write_run
from tests.conftest import prompt_ids, tiny_model
from tests.test_run import REPO, assert_refused, quick_args, read_samples, read_summary

runner = CliRunner()
PASSKEY = load_task_specs("passkey")["passkey"]


# --- registration and options ----------------------------------------------------------------------

def test_ruler_and_ppl_are_registered_suites():
    assert {"ruler", "ppl"} <= set(suites())
    assert get_suite("ruler").task_names()[:2] == ["niah_single_1", "niah_single_2"]
    assert "hamlet" in get_suite("ppl").task_names()
    assert higher_is_better("ruler") and not higher_is_better("ppl") and higher_is_better("no-such-suite")


def test_new_options_parse_and_stay_out_of_an_old_runs_key(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("words")
    opts = build_options({"protocol": "query-agnostic,query-aware", "ppl_chunk": "64", "text_file": str(text)})
    assert opts.protocols == ["query-agnostic", "query-aware"] and opts.ppl_chunk == 64
    assert opts.key()["text_file"] == str(text)
    # at their defaults the new options are not in the key: folders written before them still resume
    assert not {"protocols", "ppl_chunk", "text_file"} & set(RunOptions().key())
    assert RunOptions().default_run_name() == RunOptions(protocols=["query-aware"]).default_run_name()
    with pytest.raises(UsageError, match="repeats query-aware"):
        build_options({"protocol": "query-aware,query-aware"})


BAD = {
    "missing text file": (["--suite", "ppl", "--text-file", "/nonexistent/arkv.txt"], ["--text-file", "not a file"]),
    "zero ppl chunk": (["--suite", "ppl", "--ppl-chunk", "0"], ["--ppl-chunk", "at least 1"]),
    "unknown protocol": (["--protocol", "query-aware,blind"], ["unknown protocol 'blind'", "query-agnostic"]),
    "ppl has no question": (["--suite", "ppl", "--protocol", "query-agnostic"], ["--suite ppl has no question", "--protocol query-aware"]),
    "unknown ruler task": (["--suite", "ruler", "--tasks", "niah_nope"], ["unknown task", "niah_nope"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_2(case, tmp_path):
    args, words = BAD[case]
    result = runner.invoke(app, ["run", *args, *quick_args(tmp_path)], catch_exceptions=False)
    assert_refused(result, tmp_path / "out", *words)


# --- query-agnostic generation ---------------------------------------------------------------------

@pytest.mark.parametrize("seed, split", [(1, 40), (2, 97), (3, 120)])
def test_full_cache_gives_the_same_tokens_under_both_protocols(llama, seed, split):
    ids = prompt_ids(128, seed=seed)
    aware = greedy_generate(llama, ids, torch.ones_like(ids), make_cache("full", llama.config), 12)
    cache = make_cache("full", llama.config)
    mask, seconds = protocols.compress_context(llama, ids[0, :split].tolist(), cache)
    agnostic = protocols.generate_after_context(llama, ids[0, split:].tolist(), mask, cache, 12)
    assert agnostic.tokens == aware.tokens and seconds > 0
    assert agnostic.kv_bytes == aware.kv_bytes and len(agnostic.itl_s) == 11


def test_query_agnostic_compresses_the_context_alone(llama):
    ids = prompt_ids(200, seed=5)
    cache = make_cache("snapkv", llama.config, cache_size=64, window_size=8)
    mask, _ = protocols.compress_context(llama, ids[0, :160].tolist(), cache, reserve=40 + 4)
    held = [layer["original"] for layer in cache.stats()["layers"]]
    assert cache.compressed and held == [64] * len(held)  # 64 of the context's 160 tokens
    # the slots: 64 kept + 44 reserved for the question and answer (+1), of the 160 a full cache holds now
    assert cache.kv_bytes() < cache.full_kv_bytes() * 0.7
    gen = protocols.generate_after_context(llama, ids[0, 160:].tolist(), mask, cache, 4)
    aware = greedy_generate(llama, ids, torch.ones_like(ids),
                            make_cache("snapkv", llama.config, cache_size=64, window_size=8), 4)
    # the question's 40 tokens come after the compression: kept in full, beyond the budget
    assert gen.kv_bytes > 1.4 * aware.kv_bytes  # ~64 + 40 + 3 tokens against ~64 + 3


def _answer(model, ids: torch.Tensor, split: int, new: int, eos=()):
    cache = make_cache("full", model.config)
    mask, _ = protocols.compress_context(model, ids[0, :split].tolist(), cache)
    return protocols.generate_after_context(model, ids[0, split:].tolist(), mask, cache, new, eos)


def test_eos_ends_the_answer(llama):
    ids = prompt_ids(64, seed=7)
    free = _answer(llama, ids, 8, 10)
    eos = free.tokens[0][3]
    cut = _answer(llama, ids, 8, 10, [eos])
    first = free.tokens[0].index(eos)
    assert cut.tokens == [free.tokens[0][:first]] and cut.generated == [first + 1]


class _Tokenizer:
    """Byte tokens of the tiny model's vocabulary: enough for the suite's split, decode and stops."""

    chat_template = None

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False, **_):
        data = list(text.encode("utf-8"))
        out = {"input_ids": data}
        if return_offsets_mapping:
            out["offset_mapping"] = [(i, i + 1) for i in range(len(data))]
        return _Encoding(out)

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i % 256 for i in ids).decode("utf-8", "replace")


class _Encoding(dict):
    def __getattr__(self, name):
        return self[name]


def _samples(contexts: list[str]) -> list[base.Sample]:
    return [base.Sample(sample_id=f"s{i}", prompt=c + f"\n\nQuestion {i}?", question=f"\n\nQuestion {i}?",
                        references=["x"], max_new_tokens=3) for i, c in enumerate(contexts)]


def test_shared_context_is_compressed_once_and_copied_per_question(llama, monkeypatch):
    tok = _Tokenizer()
    shared, other = "A long shared context. " * 8, "Another context, not shared. " * 6
    samples = _samples([shared, shared, shared, other])
    opts = RunOptions(protocols=["query-agnostic"], window_size=8)
    ctx = base.Context(model=llama, tokenizer=tok, opts=opts, info={}, eos=[], protocol="query-agnostic")
    for s in samples:
        s.ids = tok(s.prompt + s.tail).input_ids
        s.context_tokens = protocols.question_token(tok, False, s.prompt, s.question)
    assert [s.context_tokens for s in samples] == [len(shared)] * 3 + [len(other)]
    calls = []
    real = base.compress_context
    monkeypatch.setattr(base, "compress_context", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    suite, task = get_suite("passkey"), base.Task(name="t", chat=False, samples=samples, spec=PASSKEY)
    batches = suite.batches(ctx, task, "snapkv", 96, [])
    assert [len(b.samples) for b in batches] == [1, 1, 1, 1]
    records = [r for b in batches for r in suite.run(ctx, task, b, "snapkv", 96)]
    assert calls == [len(shared), len(other)]  # one compression per context
    paid = [r.context_prefill_s for r in records]
    assert paid[0] > 0 and paid[1] == paid[2] == 0 and paid[3] > 0
    assert all(r.protocol == "query-agnostic" and r.budget == 96 for r in records)
    # a copy per question: each answer is what a fresh compression of its context gives
    for sample, record in zip(samples, records):
        cache = make_cache("snapkv", llama.config, cache_size=96, window_size=8)
        mask, _ = real(llama, sample.ids[:sample.context_tokens], cache)
        fresh = protocols.generate_after_context(llama, sample.ids[sample.context_tokens:], mask, cache, 3)
        assert record.prediction == tok.decode(fresh.tokens[0]), sample.sample_id


def test_a_prompt_without_its_question_or_context_is_refused():
    tok = _Tokenizer()
    with pytest.raises(UsageError, match="--protocol query-aware"):
        protocols.question_token(tok, False, "context and question", "")
    with pytest.raises(UsageError, match="no context|has none"):
        protocols.question_token(tok, False, "Question?", "Question?")


def test_every_prompt_suite_declares_its_question(tmp_path):
    from arkv_bench.suites import gsm8k, longbench, mmlu
    from tests.fixtures_data import write_fixtures

    row = {"context": "Long text.", "input": "Who?"}
    for name, spec in load_task_specs("longbench").items():
        q = longbench.question(spec.prompt_template, row)
        assert q and spec.prompt_template.format(**row).endswith(q) and "Long text." not in q, name
    data = str(write_fixtures(tmp_path))
    made = gsm8k.build(load_task_specs("gsm8k")["gsm8k"], 2, 2, data)
    made += [s for spec in load_task_specs("mmlu").values() if spec.config == "abstract_algebra"
             for s in mmlu.build(spec, 2, 2, data)][:2]
    for s in made:  # few-shot block, then the question
        context = s.prompt[:len(s.prompt) - len(s.question)]
        assert s.prompt.endswith(s.question) and context.count("Answer:") == 2 and "Answer: " not in s.question


# --- compare and report ----------------------------------------------------------------------------

def _with_protocol(folder: Path, rows: list[dict]) -> None:
    """Rewrite summary.csv with the protocol column last (as runs write it now)."""
    path = folder / "summary.csv"
    with path.open(newline="", encoding="utf-8") as f:
        columns = list(csv.DictReader(f).fieldnames or [])
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=[*columns, "protocol"])
        writer.writeheader()
        writer.writerows({k: ("" if row.get(k) is None else row[k]) for k in [*columns, "protocol"]} for row in rows)


def _protocol_runs(root: Path) -> Path:
    config = {"model": LLAMA, "suite": "passkey", "options": {}}
    rows = []
    for protocol, mix in (("query-aware", (80, 90)), ("query-agnostic", (40, 70))):
        rows.append(summary_row(LLAMA, "passkey", "passkey", "full", None, score=100, protocol=protocol))
        rows += [summary_row(LLAMA, "passkey", "passkey", "mix", size, score=s, protocol=protocol)
                 for size, s in zip((256, 512), mix)]
    _with_protocol(write_run(root, "passkey", config=config, summary=rows), rows)
    ppl_rows = [summary_row(LLAMA, "ppl", "hamlet", m, c, score=s, protocol="query-aware")
                for m, c, s in (("full", None, 20.0), ("window", 256, 25.0), ("h2o", 256, 22.0))]
    _with_protocol(write_run(root, "ppl", config={**config, "suite": "ppl"}, summary=ppl_rows), ppl_rows)
    return root


def test_compare_pairs_each_protocol_with_its_own_baseline_and_ranks_a_loss_lowest(tmp_path):
    comparison = compare(find_runs([_protocol_runs(tmp_path)]))
    mix = {(r.protocol, r.cache_size): r.score_pct_of_baseline for r in comparison.rows if r.quant_type == "mix"}
    assert mix == {("query-aware", 256): 80, ("query-aware", 512): 90, ("query-agnostic", 256): 40,
                   ("query-agnostic", 512): 70}
    assert "protocol" in [c.key for c in display_columns(comparison.rows)]
    ppl_rows = [r for r in comparison.rows if r.suite == "ppl"]
    assert [r.score_pct_of_baseline for r in ppl_rows] == pytest.approx([100, 110, 125])  # full, h2o, window
    best = best_cells(comparison.rows, display_columns(comparison.rows))
    ppl_best = {comparison.rows[i].quant_type for i, key in best if key == "score"
                and comparison.rows[i].suite == "ppl"}
    assert ppl_best == {"full"}
    assert any("lower is better" in note for note in comparison.notes)
    assert pareto_front([(1, 25.0), (2, 22.0), (3, 23.0)], higher_is_better=False) == [(1, 25.0), (2, 22.0)]


def test_score_vs_cache_draws_a_line_per_method_and_protocol(tmp_path):
    comparison = compare(find_runs([_protocol_runs(tmp_path)]), suite="passkey")
    (figure,) = score_vs_cache(comparison, method_colors(["full", "mix"], "full"))
    for label in ("mix · query-aware", "mix · query-agnostic", "full · query-agnostic"):
        assert label in figure.svg
    assert 'stroke-dasharray="5 3"' in figure.svg


def test_old_summaries_without_protocol_read_as_query_aware(tmp_path):
    write_run(tmp_path, "old", config={"model": LLAMA, "suite": "passkey"},
              summary=[summary_row(LLAMA, "passkey", "passkey", "full", None, score=90)])
    (row,) = compare(find_runs([tmp_path])).rows
    assert row.protocol == "query-aware" and row.score == 90


# --- end to end on the embedded model ---------------------------------------------------------------

@pytest.fixture(scope="module")
def short_tasks(tmp_path_factory):
    import yaml

    folder = tmp_path_factory.mktemp("tasks")
    for path in (REPO / "tasks").glob("*.yaml"):
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        for entry in [doc.get("defaults") or {}, *(doc.get("tasks") or {}).values()]:
            if isinstance(entry, dict) and entry.get("max_new_tokens"):
                entry["max_new_tokens"] = min(entry["max_new_tokens"], 4)
        (folder / path.name).write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ARKV_BENCH_TASKS", str(folder))
        yield folder


@pytest.mark.slow
def test_ruler_both_protocols_end_to_end_and_resume(short_tasks, tmp_path):
    args = ["run", "--suite", "ruler", "--tasks", "niah_multiquery", "--context-lengths", "400", "--depths", "0.5",
            "--protocol", "query-aware,query-agnostic", "--quant-type", "full,snapkv", "--cache-size", "128",
            "--out", str(tmp_path), "--run-name", "r", "--quiet"]
    assert runner.invoke(app, args, catch_exceptions=False).exit_code == 0
    folder = tmp_path / "r"
    records = read_samples(folder)
    assert len(records) == 4 * 2 * 2  # 4 questions x (full, snapkv@128) x 2 protocols
    agnostic = [r for r in records if r["protocol"] == "query-agnostic"]
    for method in ("full", "snapkv"):
        paid = [r["context_prefill_s"] for r in agnostic if r["quant_type"] == method]
        assert paid[0] > 0 and paid[1:] == [0, 0, 0]  # the 4 questions share one compressed context
    full = {r["protocol"]: [x["prediction"] for x in records if x["quant_type"] == "full" and x["protocol"] == r["protocol"]]
            for r in records}
    assert full["query-aware"] == full["query-agnostic"]
    columns, rows = read_summary(folder)
    assert columns[-1] == "protocol" and len(rows) == 4
    lines = (folder / "samples.jsonl").read_text().splitlines()
    (folder / "samples.jsonl").write_text("\n".join(lines[:-3]) + "\n")  # three query-agnostic snapkv records lost
    assert runner.invoke(app, args, catch_exceptions=False).exit_code == 0
    again = read_samples(folder)
    assert len(again) == 16 and again[:-3] == records[:-3]
    assert again[-3]["context_prefill_s"] > 0  # the first resumed question pays for its context again


@pytest.mark.slow
def test_ppl_end_to_end_offline_and_resume(tmp_path):
    args = ["run", "--suite", "ppl", "--max-length", "160", "--ppl-chunk", "40", "--quant-type", "full,window",
            "--cache-size", "64", "--window-size", "16", "--out", str(tmp_path), "--run-name", "p", "--quiet"]
    assert runner.invoke(app, args, catch_exceptions=False).exit_code == 0
    folder = tmp_path / "p"
    records = read_samples(folder)
    assert [(r["task"], r["quant_type"]) for r in records] == [("hamlet", "full"), ("hamlet", "window")]
    full, window = records
    assert full["extra"]["chunk_tokens"] == [39, 40, 40, 40] and full["prompt_tokens"] == 160
    # the window's store: its budget plus room for one 40-token chunk, of the 160 tokens the full cache holds
    assert abs(window["score"] - full["score"]) > 1e-3 and window["kv_bytes"] < full["kv_bytes"] * 0.7
    _, rows = read_summary(folder)
    assert [float(r["score"]) for r in rows] == pytest.approx([full["score"], window["score"]], abs=1e-3)
    (folder / "samples.jsonl").write_text(json.dumps(full) + "\n")
    assert runner.invoke(app, args, catch_exceptions=False).exit_code == 0
    again = read_samples(folder)
    assert again[0] == full and again[1]["score"] == pytest.approx(window["score"], rel=1e-6)
