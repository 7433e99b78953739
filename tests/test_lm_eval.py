"""The lm-eval plugin (`--model arkv`) and the `lm-eval` suite, on the embedded SmolLM2-135M.

Fixture tasks (tests/fixtures_lm_eval.py) read local JSONL through `dataset_path: json`:
one generate_until, one multiple choice, one loglikelihood_rolling. `full` through the
plugin must give what lm-eval's own `hf` model gives; a tiny cache_size must change the kv
bytes and the scores of the long prompt.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's `hf` model (the reference) needs lm-eval[hf]

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from fixtures_lm_eval import write_tasks  # noqa: E402

GEN, MC, ROLL, HUB = "arkv_fx_gen", "arkv_fx_mc", "arkv_fx_roll", "arkv_fx_hub"
TINY = dict(quant_type="mix", cache_size=24, window_size=8)
# " is" cuts most answers ("The capital of France is Paris") early: the stop strings are exercised
GEN_KWARGS = {"until": [" is", "\n"], "max_gen_toks": 6, "do_sample": False}
SAMPLE_FIELDS = {"suite", "task", "sample_id", "quant_type", "cache_size", "window_size", "status", "prompt_tokens",
                 "prediction", "references", "score", "prefill_s", "ttft_ms", "itl_ms", "decode_tokens", "kv_bytes",
                 "kv_bytes_full", "compressed", "evicted_frac", "quantized_frac", "extra"}




@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("lm_eval_tasks"))


@pytest.fixture(scope="module")
def manager(task_dir: Path) -> TaskManager:
    return TaskManager(include_path=str(task_dir), include_defaults=False)


@pytest.fixture(scope="module")
def loaded():
    from arkv_bench.models import load_model

    return load_model(None, "cpu", "float32", attn_implementation="arkv")


def evaluate(model, manager, tasks, model_args=None, **kw):
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, task_manager=manager, limit=3,
                                   bootstrap_iters=0, apply_chat_template=True, gen_kwargs=GEN_KWARGS, **kw)


@pytest.fixture(scope="module")
def full_run(loaded, manager):
    from arkv_bench.lm_eval_model import ArkvLM

    model, tok, info = loaded
    lm = ArkvLM(pretrained=model, tokenizer=tok, info=info, quant_type="full", batch_size=2)
    return evaluate(lm, manager, [GEN, MC, ROLL]), lm.request_log


@pytest.fixture(scope="module")
def tiny_run(loaded, manager):
    from arkv_bench.lm_eval_model import ArkvLM

    model, tok, info = loaded
    lm = ArkvLM(pretrained=model, tokenizer=tok, info=info, batch_size=2, **TINY)
    return evaluate(lm, manager, [GEN, MC, ROLL]), lm.request_log


def test_registered_with_lm_eval():
    from lm_eval.api.registry import get_model

    from arkv_bench.lm_eval_model import ArkvLM

    assert get_model("arkv") is ArkvLM


def test_model_type_by_name_with_the_embedded_alias(manager):
    """`--model arkv --model_args pretrained=smollm2-135m,quant_type=mix,...` as lm-eval's CLI passes it."""
    import arkv_bench.lm_eval_model  # noqa: F401

    results = lm_eval.simple_evaluate(
        model="arkv", model_args="pretrained=smollm2-135m,quant_type=mix,cache_size=24,window_size=8,tau1=3.5,"
                                 "device=cpu,dtype=float32",
        tasks=[MC], task_manager=manager, limit=1, bootstrap_iters=0)
    assert 0.0 <= results["results"][MC]["acc,none"] <= 1.0
    assert results["config"]["arkv_quant_type"] == "mix"
    assert results["config"]["arkv_method_options"] == {"tau1": 3.5}


def test_full_equals_lm_eval_hf_model(full_run, manager):
    """Same task, same prompts: the plugin with the full cache scores what lm-eval's `hf` model scores."""
    from arkv_bench.models import embedded_model_dir

    ours, _ = full_run
    theirs = evaluate("hf", manager, [GEN, MC, ROLL],
                      model_args=f"pretrained={embedded_model_dir()},dtype=float32,device=cpu", batch_size=1)
    for task in (GEN, MC, ROLL):
        for a, b in zip(ours["samples"][task], theirs["samples"][task], strict=True):
            assert a["doc_id"] == b["doc_id"]
            if task == GEN:
                assert a["resps"] == b["resps"]
            else:
                ll_a = [r[0][0] if isinstance(r[0], tuple) else r[0] for r in a["resps"]]
                ll_b = [r[0][0] if isinstance(r[0], tuple) else r[0] for r in b["resps"]]
                assert ll_a == pytest.approx(ll_b, rel=1e-4, abs=1e-3)
    assert ours["results"][MC]["acc,none"] == theirs["results"][MC]["acc,none"]
    assert ours["results"][GEN]["exact_match,none"] == theirs["results"][GEN]["exact_match,none"]
    ppl = "word_perplexity,none"
    assert ours["results"][ROLL][ppl] == pytest.approx(theirs["results"][ROLL][ppl], rel=1e-4)


def test_generation_stops_batches_and_logs(full_run):
    results, log = full_run
    answers = [s["resps"][0][0] for s in results["samples"][GEN]]
    assert all(answers) and not any(" is" in a or "\n" in a for a in answers)
    gen = [e for e in log if e["request_type"] == "generate_until"]
    assert sorted(e["doc_id"] for e in gen) == [0, 1, 2]
    assert {e["batch_rows"] for e in gen} == {2, 1}  # 3 prompts in batches of 2: left padding is exercised
    assert any(e["decode_tokens"] < GEN_KWARGS["max_gen_toks"] for e in gen)  # a stop string ended one early
    for e in log:
        assert e["kv_bytes"] > 0 and e["kv_bytes"] == pytest.approx(e["kv_bytes_full"])
        assert e["prefill_s"] > 0 and e["task"] in (GEN, MC, ROLL)


def test_the_method_cache_is_the_one_used(full_run, tiny_run):
    """The long prompts (~170 tokens) do not fit a 24-token cache: bytes and scores change."""
    (full, full_log), (tiny, tiny_log) = full_run, tiny_run
    for task, kind in ((GEN, "generate_until"), (MC, "loglikelihood"), (ROLL, "loglikelihood_rolling")):
        doc0_full = [e for e in full_log if e["task"] == task and e["doc_id"] == 0]
        doc0_tiny = [e for e in tiny_log if e["task"] == task and e["doc_id"] == 0]
        assert doc0_tiny and all(e["request_type"] == kind for e in doc0_tiny)
        assert all(e["compressed"] and e["budget"] == 24 for e in doc0_tiny)
        assert max(e["kv_bytes"] for e in doc0_tiny) < 0.5 * min(e["kv_bytes"] for e in doc0_full)

    def ll(run, task):
        return [r[0][0] if isinstance(r[0], tuple) else r[0] for r in run["samples"][task][0]["resps"]]

    assert ll(tiny, MC) != pytest.approx(ll(full, MC), abs=1e-3)
    assert ll(tiny, ROLL) != pytest.approx(ll(full, ROLL), abs=1e-3)  # windows are fed in window_size chunks


def test_bad_model_args_are_named(loaded):
    from arkv_bench.lm_eval_model import ArkvLM

    model, tok, info = loaded
    with pytest.raises(ValueError, match=r"tau9.*tau1"):
        ArkvLM(pretrained=model, tokenizer=tok, quant_type="mix", tau9=1.0)
    with pytest.raises(ValueError, match="unknown quant_type 'nope'"):
        ArkvLM(pretrained=model, tokenizer=tok, quant_type="nope")
    with pytest.raises(ValueError, match="larger than window_size"):
        ArkvLM(pretrained=model, tokenizer=tok, quant_type="mix", cache_size=8, window_size=8)
    with pytest.raises(ValueError, match="gamma must be a non-negative number"):
        ArkvLM(pretrained=model, tokenizer=tok, quant_type="mix", gamma="big")


def _ctx(loaded, task_dir, **overrides):
    from arkv_bench.runner import Context, RunOptions

    model, tok, info = loaded
    opts = RunOptions(suite="lm-eval", tasks=[MC, GEN], quant_types=["full", "mix"], cache_sizes=[24], window_size=8,
                      limit=2, batch_size=2, data_dir=str(task_dir), chat_template="on", **overrides)
    return Context(model=model, tokenizer=tok, opts=opts, info=info, eos=[tok.eos_token_id])


def test_suite_writes_the_usual_results(loaded, task_dir, tmp_path, monkeypatch):
    """The runner's loop: samples.jsonl records, summary.csv with score + speed + KV columns, the same warm-up as
    every suite, resume, compare."""
    from typer.testing import CliRunner

    from arkv_bench.cli import app
    from arkv_bench.results_io import read_jsonl
    from arkv_bench import runner
    from arkv_bench.runner import Run, execute, open_run, progress_counts
    from arkv_bench.suites.lm_eval_suite import SUITE

    warmed = []
    real_warm_up = runner.warm_up
    monkeypatch.setattr(runner, "warm_up", lambda ctx, method, size: warmed.append((method, size))
                        or real_warm_up(ctx, method, size))

    ctx = _ctx(loaded, task_dir)
    folder, log, _ = open_run(ctx.opts, tmp_path, "lm", ctx.info, {MC: True, GEN: True})
    run = Run(ctx=ctx, suite=SUITE, tasks=SUITE.plan(ctx), folder=folder, log=log)
    steps = []
    execute(run, lambda label, n: steps.append(label))
    assert len(steps) == progress_counts(ctx, SUITE, run.tasks, log)[0] == 4
    # before the first timed request: once per configuration on a GPU, once per run on a CPU (nothing compiles)
    assert warmed == ([("full", None), ("mix", 24)] if ctx.model.device.type == "cuda" else [("full", None)])
    records = read_jsonl(folder / "samples.jsonl").records
    assert len(records) == 2 * 2 * 2  # 2 tasks x 2 docs x 2 configurations
    for r in records:
        assert SAMPLE_FIELDS <= set(r) and r["suite"] == "lm-eval" and r["status"] == "ok"
        assert r["score"] in (0.0, 1.0) and r["kv_bytes"] > 0 and r["prompt_tokens"] > 0
    mc = next(r for r in records if r["task"] == MC and r["sample_id"] == "1" and r["quant_type"] == "full")
    assert mc["references"] == ["blue"] and mc["extra"]["metric"] == "acc,none"
    rows = list((folder / "summary.csv").read_text().splitlines())
    header = rows[0].split(",")
    table = [dict(zip(header, row.split(","))) for row in rows[1:]]
    assert {(r["task"], r["quant_type"], r["cache_size"]) for r in table} == {
        (MC, "full", ""), (MC, "mix", "24"), (GEN, "full", ""), (GEN, "mix", "24")}
    for row in table:
        assert row["score"] != "" and float(row["kv_ratio"]) > 0 and float(row["prefill_tok_s"]) > 0
    gen_mix = next(r for r in table if r["task"] == GEN and r["quant_type"] == "mix")
    assert float(gen_mix["kv_ratio"]) < 0.7 and float(gen_mix["decode_tok_s"]) > 0
    # a rerun of the same run does nothing
    again = []
    execute(run, lambda label, n: again.append(label))
    assert again == [] and progress_counts(ctx, SUITE, run.tasks, log) == (4, 4)
    result = CliRunner().invoke(app, ["compare", str(tmp_path), "--format", "csv"])
    assert result.exit_code == 0, result.output
    assert MC in result.output and "mix" in result.output


def test_hub_task_offline_fails_fast_and_clearly(loaded, task_dir, monkeypatch):
    from arkv_bench.suites.lm_eval_suite import LmEvalError, run_lm_eval

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ctx = _ctx(loaded, task_dir)
    started = time.perf_counter()
    with pytest.raises(LmEvalError) as err:
        run_lm_eval(ctx, [HUB], "full", None)
    assert time.perf_counter() - started < 15
    message = str(err.value)
    assert HUB in message and "offline" in message and "dataset_path: json" in message and "--data-dir" in message


def test_main_metric_and_corpus_metrics(full_run):
    from arkv_bench.suites.lm_eval_suite import main_metric, to_records

    results, log = full_run
    assert main_metric(results, MC) == ("acc", "none")
    assert main_metric(results, ROLL) == ("word_perplexity", "none")
    run = to_records(results, log, "full", None, 32, True, None)
    records = [r.to_json() for r in run.records]
    roll = [r for r in records if r["task"] == ROLL]
    assert roll and all(r["score"] is None for r in roll)  # perplexity has no per-sample score
    assert math.isclose(roll[0]["extra"]["task_score"], results["results"][ROLL]["word_perplexity,none"])
    assert run.scores[MC] == results["results"][MC]["acc,none"]
    json.dumps(records)  # records are plain JSON


def test_lm_eval_command_line_wrapper(task_dir, capsys, monkeypatch):
    """`arkv-lm-eval` = lm-eval's own CLI with `--model arkv` registered (lm-eval's default --device cuda:0
    falls back to the CPU here, as its `hf` model does)."""
    from arkv_bench.lm_eval_cli import main

    monkeypatch.setattr("sys.argv", ["arkv-lm-eval"])
    handlers = list(logging.getLogger("lm_eval").handlers)  # lm-eval's setup_logging binds one to captured stderr
    monkeypatch.setattr(logging.getLogger("lm_eval"), "handlers", handlers)
    main(["--model", "arkv", "--model_args", "pretrained=smollm2-135m,quant_type=mix,cache_size=24,window_size=8",
          "--tasks", MC, "--include_path", str(task_dir), "--limit", "1"])
    printed = capsys.readouterr().out
    assert "quant_type': 'mix'" in printed and MC in printed and "acc" in printed
